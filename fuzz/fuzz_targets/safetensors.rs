//! A weights file: an error, or weights whose config is valid.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    std::env::set_var(deepis::limits::ENV, "256M");
    if let Ok(w) = deepis::weights::Weights::from_bytes(data.to_vec(), "fuzz.safetensors") {
        assert!(w.config.validate().is_ok());
        assert!(w.param_count() > 0);
    }
});
