//! A config JSON: an error, or a config within the budget that has parameters.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    std::env::set_var(deepis::limits::ENV, "256M");
    if let Ok(c) = deepis::config::Config::from_json(&String::from_utf8_lossy(data)) {
        if deepis::weights::check_param_budget(&c).is_ok() {
            assert!(deepis::weights::param_count(&c) > 0);
        }
    }
});
