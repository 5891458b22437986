//! A volume file (tif): an error, or a volume that holds its shape's finite values.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    std::env::set_var(deepis::limits::ENV, "256M");
    if let Ok(v) = deepis::io::read_volume_bytes(std::path::Path::new("fuzz.tif"), data) {
        assert_eq!(v.tensor.data.len(), v.tensor.shape.len());
        assert!(v.tensor.data.iter().all(|x| x.is_finite()));
        assert!((3..=5).contains(&v.rank));
    }
});
