//! A Python pickle reader that executes nothing: it interprets the opcodes PyTorch checkpoints
//! use (protocols 2-5) into plain values, and accepts only the globals PyTorch writes for a
//! state_dict or an optimizer state (ordered dicts, tensor rebuilds, storage types). Any other
//! global (os.system, builtins.eval, a user class, ...) is refused by name at the GLOBAL opcode,
//! before anything could use it. Persistent ids (PyTorch's storage references) are returned as
//! values for the caller to resolve.
//!
//! Objects live in an arena (`Vec<Obj>`), the stack and the memo hold indices: pickles mutate
//! memoised containers (SETITEMS after BINPUT), and indices keep that cheap and cycle-safe.
//! Every length is checked against the bytes left before anything is allocated.
use std::fmt;

/// Why a pickle was not read.
#[derive(Debug, Clone, PartialEq)]
pub struct PickleError(pub String);

impl fmt::Display for PickleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

type R<T> = std::result::Result<T, PickleError>;

fn err<T>(m: impl Into<String>) -> R<T> {
    Err(PickleError(m.into()))
}

/// The globals PyTorch's `torch.save` writes for tensors, state_dicts and optimizer states.
const ALLOWED_GLOBALS: &[(&str, &str)] = &[
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "FloatStorage"),
    ("torch", "DoubleStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ShortStorage"),
    ("torch", "CharStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
];

/// A value of the pickle. Containers refer to other objects by arena index.
#[derive(Clone, Debug, PartialEq)]
pub enum Obj {
    None,
    Bool(bool),
    Int(i64),
    /// An integer too large for i64: its little-endian two's-complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<usize>),
    List(Vec<usize>),
    /// dict and OrderedDict, in insertion order.
    Dict(Vec<(usize, usize)>),
    /// An allowed global, by module and name.
    Global(String, String),
    /// A persistent id (BINPERSID): the object the id was made of.
    PersId(usize),
    /// `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`.
    Tensor { storage: usize, offset: usize, size: Vec<usize>, stride: Vec<usize> },
    Mark,
}

/// A parsed pickle: the arena and the index of the top object.
pub struct Pickle {
    pub objs: Vec<Obj>,
    pub root: usize,
}

impl Pickle {
    pub fn get(&self, i: usize) -> &Obj {
        &self.objs[i]
    }

    /// The string of object `i`, if it is one.
    pub fn str(&self, i: usize) -> Option<&str> {
        match &self.objs[i] {
            Obj::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The entries of a dict.
    pub fn dict(&self, i: usize) -> Option<&[(usize, usize)]> {
        match &self.objs[i] {
            Obj::Dict(d) => Some(d),
            _ => None,
        }
    }

    /// The value of key `k` (a string) of dict `i`.
    pub fn field(&self, i: usize, k: &str) -> Option<usize> {
        self.dict(i)?.iter().find(|(key, _)| self.str(*key) == Some(k)).map(|e| e.1)
    }

    /// The items of a list or tuple.
    pub fn items(&self, i: usize) -> Option<&[usize]> {
        match &self.objs[i] {
            Obj::List(v) | Obj::Tuple(v) => Some(v),
            _ => None,
        }
    }

    /// A number as f64 (int, float or bool).
    pub fn num(&self, i: usize) -> Option<f64> {
        match &self.objs[i] {
            Obj::Int(v) => Some(*v as f64),
            Obj::Float(v) => Some(*v),
            Obj::Bool(b) => Some(*b as i32 as f64),
            _ => None,
        }
    }
}

/// Reads one pickle from `data[pos..]`; returns it and the offset after its STOP opcode.
pub fn parse(data: &[u8], pos: usize) -> R<(Pickle, usize)> {
    let mut m = Machine { data, pos, objs: Vec::new(), stack: Vec::new(), memo: Vec::new() };
    let root = m.run()?;
    Ok((Pickle { objs: m.objs, root }, m.pos))
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    objs: Vec<Obj>,
    stack: Vec<usize>,
    memo: Vec<Option<usize>>,
}

impl Machine<'_> {
    fn take(&mut self, n: usize) -> R<&[u8]> {
        if self.data.len() - self.pos < n {
            return err(format!("pickle truncated at byte {}: {n} more bytes needed, {} left", self.pos, self.data.len() - self.pos));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }

    fn uint(&mut self, n: usize) -> R<u64> {
        let b = self.take(n)?;
        Ok(b.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64))
    }

    /// A length prefix of `n` bytes, checked against what is left.
    fn len(&mut self, n: usize) -> R<usize> {
        let l = self.uint(n)?;
        if l > (self.data.len() - self.pos) as u64 {
            return err(format!("pickle claims {l} bytes at byte {}, only {} left", self.pos, self.data.len() - self.pos));
        }
        Ok(l as usize)
    }

    fn push(&mut self, o: Obj) {
        self.objs.push(o);
        self.stack.push(self.objs.len() - 1);
    }

    fn pop(&mut self) -> R<usize> {
        match self.stack.pop() {
            Some(i) if self.objs[i] != Obj::Mark => Ok(i),
            _ => err(format!("malformed pickle: stack underflow at byte {}", self.pos)),
        }
    }

    /// The top `n` objects, in stack order.
    fn pop_n(&mut self, n: usize) -> R<Vec<usize>> {
        let mut v = (0..n).map(|_| self.pop()).collect::<R<Vec<usize>>>()?;
        v.reverse();
        Ok(v)
    }

    fn top(&self) -> R<usize> {
        self.stack.last().copied().ok_or_else(|| PickleError(format!("malformed pickle: empty stack at byte {}", self.pos)))
    }

    /// Everything above the topmost mark, removing the mark.
    fn pop_mark(&mut self) -> R<Vec<usize>> {
        let k = self.stack.iter().rposition(|&i| self.objs[i] == Obj::Mark).ok_or_else(|| PickleError(format!("malformed pickle: no MARK at byte {}", self.pos)))?;
        let items = self.stack.split_off(k + 1);
        self.stack.pop();
        Ok(items)
    }

    fn memo_put(&mut self, k: usize) -> R<()> {
        // Python's pickler numbers memo entries 0, 1, 2, ...: a jump ahead would only make us allocate
        if k > self.memo.len() {
            return err(format!("malformed pickle: memo index {k} skips ahead of the {} entries so far", self.memo.len()));
        }
        let v = self.top()?;
        if self.memo.len() <= k {
            self.memo.resize(k + 1, None);
        }
        self.memo[k] = Some(v);
        Ok(())
    }

    fn memo_get(&mut self, k: usize) -> R<()> {
        match self.memo.get(k).copied().flatten() {
            Some(v) => {
                self.stack.push(v);
                Ok(())
            }
            None => err(format!("malformed pickle: memo entry {k} read before it was written")),
        }
    }

    fn text(&mut self, n: usize) -> R<String> {
        let l = self.len(n)?;
        let b = self.take(l)?;
        String::from_utf8(b.to_vec()).map_err(|_| PickleError(format!("pickle string before byte {} is not UTF-8", self.pos)))
    }

    /// GLOBAL and STACK_GLOBAL: only the allow-list; the rest is refused by name.
    fn global(&mut self, module: String, name: String) -> R<()> {
        if !ALLOWED_GLOBALS.iter().any(|(m, n)| *m == module && *n == name) {
            return err(format!(
                "refused: the pickle names the global {module}.{name}, which is not one of the tensor and storage rebuilds of a PyTorch \
                 checkpoint (loading this file with Python's pickle would call it; nothing was run)"
            ));
        }
        self.push(Obj::Global(module, name));
        Ok(())
    }

    fn reduce(&mut self) -> R<()> {
        let args = self.pop()?;
        let f = self.pop()?;
        let Obj::Global(module, name) = self.objs[f].clone() else {
            return err(format!("malformed pickle: REDUCE of a non-callable at byte {}", self.pos));
        };
        let a = match &self.objs[args] {
            Obj::Tuple(v) => v.clone(),
            _ => return err(format!("malformed pickle: REDUCE arguments are not a tuple at byte {}", self.pos)),
        };
        let out = match name.as_str() {
            "OrderedDict" if a.is_empty() => Obj::Dict(Vec::new()),
            "_rebuild_tensor_v2" if a.len() >= 4 => {
                let ints = |o: &Obj, objs: &[Obj]| -> Option<Vec<usize>> {
                    match o {
                        Obj::Tuple(v) => v.iter().map(|&i| match objs[i] { Obj::Int(x) if x >= 0 => Some(x as usize), _ => None }).collect(),
                        _ => None,
                    }
                };
                let (size, stride) = (ints(&self.objs[a[2]], &self.objs), ints(&self.objs[a[3]], &self.objs));
                match (&self.objs[a[0]], &self.objs[a[1]], size, stride) {
                    (Obj::PersId(_), Obj::Int(off), Some(size), Some(stride)) if *off >= 0 && size.len() == stride.len() => {
                        Obj::Tensor { storage: a[0], offset: *off as usize, size, stride }
                    }
                    _ => return err(format!("malformed tensor rebuild at byte {}", self.pos)),
                }
            }
            "_rebuild_parameter" if !a.is_empty() && matches!(self.objs[a[0]], Obj::Tensor { .. }) => self.objs[a[0]].clone(),
            _ => return err(format!("unexpected call of {module}.{name} with {} argument(s) at byte {}", a.len(), self.pos)),
        };
        self.push(out);
        Ok(())
    }

    fn setitems(&mut self, dict: usize, kv: &[usize]) -> R<()> {
        if !kv.len().is_multiple_of(2) {
            return err(format!("malformed pickle: odd SETITEMS at byte {}", self.pos));
        }
        let Obj::Dict(d) = &mut self.objs[dict] else {
            return err(format!("malformed pickle: SETITEM(S) on a non-dict at byte {}", self.pos));
        };
        d.extend(kv.chunks_exact(2).map(|c| (c[0], c[1])));
        Ok(())
    }

    fn appends(&mut self, list: usize, items: &[usize]) -> R<()> {
        let Obj::List(l) = &mut self.objs[list] else {
            return err(format!("malformed pickle: APPEND(S) on a non-list at byte {}", self.pos));
        };
        l.extend_from_slice(items);
        Ok(())
    }

    fn run(&mut self) -> R<usize> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let p = self.u8()?;
                    if !(2..=5).contains(&p) {
                        return err(format!("pickle protocol {p} is not one PyTorch writes (2-5)"));
                    }
                }
                0x95 => {
                    self.uint(8)?; // FRAME: a size hint only
                }
                b'.' => return self.pop(),
                b'(' => self.push(Obj::Mark),
                b'}' => self.push(Obj::Dict(Vec::new())),
                b']' => self.push(Obj::List(Vec::new())),
                b')' => self.push(Obj::Tuple(Vec::new())),
                b't' => {
                    let v = self.pop_mark()?;
                    self.push(Obj::Tuple(v));
                }
                0x85..=0x87 => {
                    let v = self.pop_n((op - 0x84) as usize)?;
                    self.push(Obj::Tuple(v));
                }
                // BINPUT, LONG_BINPUT
                b'q' | b'r' => {
                    let k = self.uint(if op == b'q' { 1 } else { 4 })? as usize;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len();
                    self.memo_put(k)?;
                }
                // BINGET, LONG_BINGET
                b'h' | b'j' => {
                    let k = self.uint(if op == b'h' { 1 } else { 4 })? as usize;
                    self.memo_get(k)?;
                }
                b'J' => {
                    let v = self.uint(4)? as u32 as i32 as i64;
                    self.push(Obj::Int(v));
                }
                // BININT1, BININT2 (unsigned)
                b'K' | b'M' => {
                    let v = self.uint(if op == b'K' { 1 } else { 2 })? as i64;
                    self.push(Obj::Int(v));
                }
                0x8a | 0x8b => {
                    let n = self.len(if op == 0x8a { 1 } else { 4 })?;
                    let b = self.take(n)?.to_vec();
                    let o = if n == 0 {
                        Obj::Int(0)
                    } else if n <= 8 {
                        let mut v = b.iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64);
                        if n < 8 && b[n - 1] & 0x80 != 0 {
                            v |= u64::MAX << (8 * n);
                        }
                        Obj::Int(v as i64)
                    } else {
                        Obj::BigInt(b)
                    };
                    self.push(o);
                }
                b'G' => {
                    let b = self.take(8)?;
                    let v = f64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
                    self.push(Obj::Float(v));
                }
                b'N' => self.push(Obj::None),
                0x88 => self.push(Obj::Bool(true)),
                0x89 => self.push(Obj::Bool(false)),
                // SHORT_BINUNICODE, BINUNICODE, BINUNICODE8: the length's width
                0x8c | b'X' | 0x8d => {
                    let s = self.text(match op {
                        0x8c => 1,
                        b'X' => 4,
                        _ => 8,
                    })?;
                    self.push(Obj::Str(s));
                }
                b'U' | b'T' | b'C' | b'B' | 0x8e => {
                    let n = self.len(match op {
                        b'U' | b'C' => 1,
                        b'T' | b'B' => 4,
                        _ => 8,
                    })?;
                    let b = self.take(n)?.to_vec();
                    self.push(Obj::Bytes(b));
                }
                // SETITEM (one key and value), SETITEMS (those above the mark)
                b's' | b'u' => {
                    let kv = if op == b's' { self.pop_n(2)? } else { self.pop_mark()? };
                    let d = self.top()?;
                    self.setitems(d, &kv)?;
                }
                // APPEND (one item), APPENDS (those above the mark)
                b'a' | b'e' => {
                    let items = if op == b'a' { self.pop_n(1)? } else { self.pop_mark()? };
                    let l = self.top()?;
                    self.appends(l, &items)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?;
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (&self.objs[module], &self.objs[name]) {
                        (Obj::Str(m), Obj::Str(n)) => {
                            let (m, n) = (m.clone(), n.clone());
                            self.global(m, n)?;
                        }
                        _ => return err(format!("malformed pickle: STACK_GLOBAL of non-strings at byte {at}")),
                    }
                }
                b'R' => self.reduce()?,
                b'b' => {
                    // BUILD: the state of an OrderedDict (a state_dict's `_metadata`) is not needed
                    self.pop()?;
                    self.top()?;
                }
                b'Q' => {
                    let id = self.pop()?;
                    self.push(Obj::PersId(id));
                }
                b'0' => {
                    self.stack.pop().ok_or_else(|| PickleError(format!("malformed pickle: POP of an empty stack at byte {at}")))?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let t = self.top()?;
                    self.stack.push(t);
                }
                _ => return err(format!("pickle opcode 0x{op:02x} at byte {at} is not one PyTorch checkpoints use")),
            }
        }
    }

    /// A newline-terminated ASCII line (the GLOBAL opcode's module and name).
    fn line(&mut self) -> R<String> {
        let rest = &self.data[self.pos..];
        let n = rest.iter().take(256).position(|&c| c == b'\n').ok_or_else(|| PickleError(format!("malformed GLOBAL at byte {}", self.pos)))?;
        let s = String::from_utf8_lossy(&rest[..n]).into_owned();
        self.pos += n + 1;
        Ok(s)
    }
}
