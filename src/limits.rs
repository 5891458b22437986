//! The one memory budget: every size a file header, a config or an option claims is multiplied
//! out in checked arithmetic and compared with it before anything is allocated, so a 144-byte
//! file cannot ask for 40 GB. The budget is the machine's memory (the cgroup limit when lower),
//! or `DEEPIS_MAX_MEMORY` (bytes, or with a K/M/G/T suffix) when set.
use std::sync::OnceLock;

/// The variable that overrides the budget.
pub const ENV: &str = "DEEPIS_MAX_MEMORY";

/// Bytes any one request may use.
pub fn budget() -> u64 {
    static B: OnceLock<u64> = OnceLock::new();
    *B.get_or_init(|| std::env::var(ENV).ok().and_then(|s| parse_bytes(&s)).unwrap_or_else(machine_memory))
}

/// "512M", "2G", "1.5T" or a plain byte count.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return None,
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let v: f64 = num.trim().parse().ok()?;
    (v.is_finite() && v > 0.0).then(|| (v * mult as f64).min(u64::MAX as f64) as u64)
}

/// MemTotal, or the cgroup's memory.max when that is lower; 16 GiB when neither can be read.
fn machine_memory() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|kb| kb * 1024);
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok().and_then(|s| s.trim().parse::<u64>().ok());
    match (total, cgroup) {
        (Some(t), Some(c)) => t.min(c),
        (Some(t), None) => t,
        (None, Some(c)) => c,
        (None, None) => 16 << 30,
    }
}

/// The product of `dims`, or None when it overflows a u64.
pub fn product<T: Copy + Into<u64>>(dims: &[T]) -> Option<u64> {
    dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d.into()))
}

/// `count` elements of `elem` bytes, or None on overflow.
pub fn bytes_of(count: Option<u64>, elem: u64) -> Option<u64> {
    count?.checked_mul(elem)
}

/// Ok when `bytes` (None: more than 2^64) fits the budget; otherwise a message such as
/// "the volume needs 37.3 GiB, this machine has 23.5 GiB".
pub fn check(what: &str, bytes: Option<u64>) -> Result<(), String> {
    let limit = budget();
    match bytes {
        Some(b) if b <= limit => Ok(()),
        b => {
            let need = b.map_or_else(|| "more than 2^64 bytes".to_string(), gb);
            if std::env::var(ENV).is_ok_and(|s| parse_bytes(&s).is_some()) {
                Err(format!("{what} needs {need}, more than {ENV}={}", gb(limit)))
            } else {
                Err(format!("{what} needs {need}, this machine has {}", gb(limit)))
            }
        }
    }
}

/// Bytes in binary units, as the error messages show them.
pub fn gb(b: u64) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{b:.0} bytes")
    }
}
