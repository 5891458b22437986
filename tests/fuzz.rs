//! The loaders under a corpus-driven fuzz run on stable Rust: the valid test files, the hostile
//! files of issue 13, and seeded mutations of both (bit flips, interesting integers, truncation,
//! splices), through the npy, TIFF, MAT, safetensors and config-JSON readers. For every case:
//! no panic, no allocation over the budget (a counting global allocator; a single request over
//! 1 GiB is refused, which aborts the binary with a message naming the size), and either a clear
//! error or a result that holds together. Bounded: DEEPIS_FUZZ_ITERS cases per format (default
//! 10000) or DEEPIS_FUZZ_SECS seconds per format (default 8), whichever ends first. A longer
//! campaign: `DEEPIS_FUZZ_ITERS=100000000 DEEPIS_FUZZ_SECS=600 cargo test --release --test fuzz
//! -- --nocapture`; with nightly, `cargo fuzz` (README, "Fuzzing the loaders").
mod common;
use common::corpus::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Mutex;

struct Counting;
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// No single request of a loader may be larger (the budget below is 256 MiB).
const MAX_REQUEST: usize = 1 << 30;

fn refuse(size: usize) {
    let msg = format!("fuzz: refused an allocation of {size} bytes (over {MAX_REQUEST})\n");
    // SAFETY: write(2) of a valid buffer.
    unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if l.size() > MAX_REQUEST {
            refuse(l.size());
            return std::ptr::null_mut();
        }
        let p = System.alloc(l);
        if !p.is_null() {
            let now = CURRENT.fetch_add(l.size(), Relaxed) + l.size();
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        CURRENT.fetch_sub(l.size(), Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        if new > MAX_REQUEST {
            refuse(new);
            return std::ptr::null_mut();
        }
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            if new >= l.size() {
                let now = CURRENT.fetch_add(new - l.size(), Relaxed) + new - l.size();
                PEAK.fetch_max(now, Relaxed);
            } else {
                CURRENT.fetch_sub(l.size() - new, Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static A: Counting = Counting;

/// The budget the loaders are given, and what a case may allocate beyond what was live before it
/// (a checked request is at most the budget; conversions keep a second copy briefly).
const BUDGET: &str = "256M";
const ALLOWED: usize = 3 << 28;

/// No case may take longer: the `-timeout` of the cargo fuzz campaign (README), far above the
/// milliseconds a refusal takes and far below the hours of a parser that backtracks.
const CASE_SECS: f64 = 10.0;

/// One case at a time: the peak counter is global.
static SERIAL: Mutex<()> = Mutex::new(());

fn setup() -> std::sync::MutexGuard<'static, ()> {
    let g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    std::env::set_var(deepis::limits::ENV, BUDGET);
    assert_eq!(deepis::limits::budget(), 256 << 20, "the budget is set before any loader runs");
    g
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A SplitMix64 stream: the mutations are the same on every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u64; 10] = [0, 1, 0x7F, 0xFF, 0x7FFF, 0xFFFF, 0x7FFF_FFFF, 0xFFFF_FFFF, 0x8000_0000_0000_0000, u64::MAX];

/// 1 to 4 mutations of `seed`; text-like inputs also get digits replaced by huge numbers.
fn mutate(seed: &[u8], r: &mut Rng) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..1 + r.below(4) {
        let n = v.len().max(1);
        match r.below(7) {
            0 if !v.is_empty() => {
                let i = r.below(n);
                v[i] ^= 1 << r.below(8);
            }
            1 if !v.is_empty() => {
                let i = r.below(n);
                v[i] = r.next() as u8;
            }
            2 if v.len() >= 8 => {
                let i = r.below(v.len() - 7);
                let w = INTERESTING[r.below(INTERESTING.len())].to_le_bytes();
                let k = [1, 2, 4, 8][r.below(4)];
                v[i..i + k].copy_from_slice(&w[..k]);
            }
            3 => v.truncate(r.below(n)),
            4 if !v.is_empty() => {
                let (a, len) = (r.below(n), 1 + r.below(64));
                let chunk: Vec<u8> = v[a..(a + len).min(v.len())].to_vec();
                let at = r.below(n);
                v.splice(at..at, chunk);
            }
            5 => {
                // a number in a text header becomes a huge one
                if let Some(i) = (0..v.len()).map(|_| r.below(n)).find(|&i| v[i].is_ascii_digit()) {
                    let big = ["4611686018427387905", "18446744073709551615", "4294967296", "1000000", "0", "-1"][r.below(6)];
                    v.splice(i..i + 1, big.bytes());
                }
            }
            _ => {
                let i = r.below(n);
                v.insert(i.min(v.len()), r.next() as u8);
            }
        }
    }
    v
}

/// Runs `load` on the seeds and `iters` mutations, checking each outcome.
/// Call with the guard of [`setup`] held (the seeds are made under it too, so that no other
/// test allocates while a case is measured).
fn campaign(format: &str, seeds: Vec<(String, Vec<u8>)>, load: &dyn Fn(&[u8]) -> Result<(), String>) {
    let iters = env_or("DEEPIS_FUZZ_ITERS", 10000);
    let secs = env_or("DEEPIS_FUZZ_SECS", 8);
    let mut r = Rng(0x00DE_E915 ^ format.len() as u64);
    let t0 = std::time::Instant::now();
    let (mut ok, mut refused, mut worst) = (0u64, 0u64, 0usize);
    let mut run = |name: &str, bytes: &[u8]| {
        let base = CURRENT.load(Relaxed);
        PEAK.store(base, Relaxed);
        let t = std::time::Instant::now();
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| load(bytes)));
        let took = t.elapsed().as_secs_f64();
        let extra = PEAK.load(Relaxed).saturating_sub(base);
        worst = worst.max(extra);
        if let Err(p) = out {
            let dir = std::env::temp_dir().join("deepis-fuzz-crash");
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(dir.join(format!("{format}-{name}")), bytes);
            panic!("{format} {name}: panicked ({:?}); input saved in {}", p.downcast_ref::<String>(), dir.display());
        }
        assert!(extra <= ALLOWED, "{format} {name}: allocated {extra} bytes, more than {ALLOWED}");
        assert!(took < CASE_SECS, "{format} {name}: took {took:.1} s, more than {CASE_SECS} s");
        match out.unwrap() {
            Ok(()) => ok += 1,
            Err(m) => {
                assert!(m.len() > 10 && !m.contains("panicked"), "{format} {name}: unclear error `{m}`");
                refused += 1;
            }
        }
    };
    for (name, s) in &seeds {
        run(name, s);
    }
    let mut n = 0;
    while n < iters && t0.elapsed().as_secs() < secs {
        let (_, seed) = &seeds[r.below(seeds.len())];
        let m = mutate(seed, &mut r);
        run(&format!("mutation{n}"), &m);
        n += 1;
    }
    println!(
        "{format}: {} seeds + {n} mutations in {:.1} s: {ok} read, {refused} refused with an error, no panic; peak allocation {:.1} MiB (allowed {} MiB)",
        seeds.len(),
        t0.elapsed().as_secs_f64(),
        worst as f64 / 1048576.0,
        ALLOWED >> 20
    );
}

fn file(case: &str, name: &str) -> (String, Vec<u8>) {
    (format!("{case}/{name}"), std::fs::read(common::data(case, name)).unwrap())
}

fn volume_ok(name: &str, b: &[u8]) -> Result<(), String> {
    match deepis::io::read_volume_bytes(Path::new(name), b) {
        Ok(v) => {
            assert_eq!(v.tensor.data.len(), v.tensor.shape.len(), "a volume holds its shape's values");
            assert!(v.tensor.data.iter().all(|x| x.is_finite()), "a volume read is finite");
            assert!((3..=5).contains(&v.rank));
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

fn npy_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = vec![file("tiny", "input.npy"), file("tiny", "target.npy"), file("tiny", "aux3.npy")];
    seeds.push(("overflow".into(), overflow_npy("(4611686018427387905, 4, 1)", false)));
    seeds.push(("overflow4d".into(), overflow_npy("(4611686018427387905, 4, 1, 1)", false)));
    seeds.push(("overflow_fortran".into(), overflow_npy("(4611686018427387905, 4, 1)", true)));
    seeds.push(("fortran".into(), npy_bytes(1, "{'descr': '<f8', 'fortran_order': True, 'shape': (2, 3, 4), }", &[0u8; 192])));
    seeds.push(("u16_v2".into(), npy_bytes(2, "{'descr': '<u2', 'fortran_order': False, 'shape': (2, 2, 2), }", &[1u8; 16])));
    let mut hl = npy_bytes(2, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 2, 2), }", &[0u8; 32]);
    hl[8..12].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
    seeds.push(("header_len".into(), hl));
    // found by cargo fuzz: npyz's header parser backtracks exponentially in the nesting
    for (name, open, close) in [("deep_lists", "[", ""), ("deep_sets", "{", ""), ("deep_closed_sets", "{", "}")] {
        let h = format!("{{'descr': '<f4', 'fortran_order': False, 'x': {}{}, 'shape': (2, 2, 2), }}", open.repeat(40), close.repeat(40));
        seeds.push((name.into(), npy_bytes(1, &h, &[0u8; 32])));
    }
    seeds
}

fn tiff_seeds() -> Vec<(String, Vec<u8>)> {
    let mut bomb = float_tiff(1, None);
    for tag in [256, 257, 278] {
        patch_tiff_tag(&mut bomb, tag, 100_000);
    }
    let mut bomb_z = bomb.clone();
    patch_tiff_tag(&mut bomb_z, 259, 8);
    vec![("float32".into(), float_tiff(3, None)), ("mixed".into(), float_tiff(4, Some(2))), ("bomb".into(), bomb), ("bomb_deflate".into(), bomb_z)]
}

fn mat_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds: Vec<(String, Vec<u8>)> = ["cell_v6.mat", "cell_v7.mat", "masks.mat", "no_target.mat"].iter().map(|n| file("mat", n)).collect();
    seeds.push(("inflates_past".into(), mat_bytes(&zlib(std::iter::once(mi_matrix_tag(64)).chain(std::iter::once(vec![0u8; 1 << 22]))))));
    seeds.push(("promises_2g".into(), mat_bytes(&zlib(std::iter::once(mi_matrix_tag(2_100_000_000))))));
    // found by cargo fuzz: a size whose product overflows matfile's i32; and a nested stream
    seeds.push(("dims_overflow".into(), mat_bytes(&zlib(std::iter::once(mi_single_array("input", &[4, 0x4000_0003, 5], &[1.0; 60]))))));
    let nested = mi_compressed(std::iter::once(mi_single_array("input", &[2, 2, 2], &[1.0; 8])));
    seeds.push(("nested_compressed".into(), mat_bytes(&zlib(std::iter::once(nested)))));
    seeds
}

fn safetensors_seeds() -> Vec<(String, Vec<u8>)> {
    vec![file("tiny", "weights.safetensors"), file("readme", "weights.safetensors")]
}

fn config_seeds() -> Vec<(String, Vec<u8>)> {
    [
        deepis::config::Config::default().to_json(),
        r#"{"widths": [4, 8, 8, 16, 16], "trans_feature": 4}"#.to_string(),
        r#"{"widths": [1000000, 8, 8, 16, 16]}"#.into(),
        r#"{"trans_feature": 1099511627776}"#.into(),
        r#"{"blocks": [1000000, 1, 1, 1]}"#.into(),
        r#"{"gcn_kernels": [1000001, 7, 7, 3]}"#.into(),
        r#"{"head": "sigmoid", "out_channels": 18446744073709551615}"#.into(),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, s)| (format!("config{i}"), s.into_bytes()))
    .collect()
}

#[test]
fn fuzz_npy() {
    let _g = setup();
    campaign("npy", npy_seeds(), &|b| volume_ok("f.npy", b));
}

#[test]
fn fuzz_tiff() {
    let _g = setup();
    campaign("tiff", tiff_seeds(), &|b| volume_ok("f.tif", b));
}

#[test]
fn fuzz_mat() {
    let _g = setup();
    // one channel (a distance target) or two (masks): read when either fits
    campaign("mat", mat_seeds(), &|b| {
        let mut err = String::new();
        for c in [1, 2] {
            match deepis::train::data::read_mat_bytes(Path::new("f.mat"), b, c) {
                Ok((x, t)) => {
                    assert_eq!(x.shape.d, t.shape.d);
                    assert_eq!((x.data.len(), t.data.len()), (x.shape.len(), t.shape.len()));
                    assert_eq!(t.shape.c, c);
                    return Ok(());
                }
                Err(e) => err = e.to_string(),
            }
        }
        Err(err)
    });
}

#[test]
fn fuzz_safetensors() {
    let _g = setup();
    campaign("safetensors", safetensors_seeds(), &|b| match deepis::weights::Weights::from_bytes(b.to_vec(), "f.safetensors") {
        Ok(w) => {
            w.config.validate().map_err(|e| e.to_string())?;
            assert!(w.param_count() > 0);
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    });
}

#[test]
fn fuzz_config_json() {
    let _g = setup();
    campaign("config", config_seeds(), &|b| {
        let text = String::from_utf8_lossy(b);
        let c = deepis::config::Config::from_json(&text).map_err(|e| e.to_string())?;
        deepis::weights::check_param_budget(&c).map_err(|e| e.to_string())?;
        assert!(deepis::weights::param_count(&c) > 0);
        Ok(())
    });
}

/// Writes the seeds into fuzz/corpus/<target>/, the starting corpus of `cargo fuzz`:
/// `cargo test --release --test fuzz write_fuzz_corpus -- --ignored`.
#[test]
#[ignore]
fn write_fuzz_corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (target, seeds) in [("npy", npy_seeds()), ("tiff", tiff_seeds()), ("mat", mat_seeds()), ("safetensors", safetensors_seeds()), ("config", config_seeds())] {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, b) in seeds {
            std::fs::write(dir.join(name.replace('/', "_")), b).unwrap();
        }
    }
}
