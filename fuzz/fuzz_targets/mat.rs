//! A MAT training sample: an error, or input and target of one size.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    std::env::set_var(deepis::limits::ENV, "256M");
    for c in [1, 2] {
        if let Ok((x, t)) = deepis::train::data::read_mat_bytes(std::path::Path::new("fuzz.mat"), data, c) {
            assert_eq!(x.shape.d, t.shape.d);
            assert_eq!((x.data.len(), t.data.len()), (x.shape.len(), t.shape.len()));
            assert_eq!(t.shape.c, c);
        }
    }
});
