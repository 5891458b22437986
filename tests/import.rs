//! `deepis import` on checkpoints written by PyTorch itself (tests/data/torch/make_checkpoints.py):
//! the zip and legacy formats, the published trainer's dict (DataParallel `module.` names, Adam
//! state) and bare state_dicts. Imported networks must hold the golden weights bit for bit and
//! predict the golden outputs within max|a-e| / max(1, max|e|) <= 1e-4; the Adam moments must be
//! PyTorch's exactly; a pickle that would run a command is refused and runs nothing; random
//! mutations of every checkpoint give an error or a valid import, never a panic.
mod common;
use common::*;
use deepis::config::{Config, Downsample, Head};
use deepis::cpu::CpuBackend;
use deepis::import::{import, ImportOptions};
use deepis::model::Network;
use deepis::rng::Rng;
use deepis::tensor::rel_err;
use deepis::train::run::Start;
use deepis::weights::Weights;
use std::path::PathBuf;
use std::process::Command;

fn ckpt(name: &str) -> PathBuf {
    data("torch", name)
}

fn readme_opts() -> ImportOptions {
    ImportOptions { downsample: Downsample::Maxpool, input_offset: 1.337, input_scale: 0.03, ..ImportOptions::default() }
}

/// Imports, checks the config and every network tensor against the golden weights, and the
/// prediction against the golden output.
fn check_import(file: &str, case: &str, opts: &ImportOptions) -> Weights {
    let im = import(&ckpt(file), opts).unwrap_or_else(|e| panic!("{file}: {e}"));
    let golden = Weights::load(&data(case, "weights.safetensors")).unwrap();
    assert_eq!(im.config, golden.config, "{file}: config inferred from the shapes");
    let w = Weights::from_bytes(im.to_bytes().unwrap(), file).unwrap();
    let gt = golden.to_tensors().unwrap();
    for (name, shape, want) in &gt {
        assert_eq!(w.shape(name), Some(shape.as_slice()), "{file}: {name}");
        assert!(same_bits(&w.get(name).unwrap(), want), "{file}: {name} differs from the golden weights");
    }
    let net = Network::new(CpuBackend::new(), &w).unwrap();
    let x = read_5d(&data(case, "input.npy"));
    let got = net.forward(&x).unwrap();
    let e = rel_err(&got.data, &read_5d(&data(case, "expected.npy")).data, 1.0);
    println!("{file:<30} {} tensors, config {}, prediction rel err {e:.3e}", gt.len(), im.config.to_json());
    assert!(e <= 1e-4, "{file}: prediction rel err {e:.3e}");
    w
}

#[test]
fn trainer_checkpoints_in_both_formats_import_with_their_adam_state() {
    let adam = read_safetensors(&ckpt("tiny_adam.safetensors"));
    for (file, format) in [("tiny_trainer.pth.tar", "zip"), ("tiny_trainer_legacy.pth.tar", "legacy")] {
        let w = check_import(file, "tiny", &ImportOptions::default());
        let source: serde_json::Value = serde_json::from_str(&w.meta["source"]).unwrap();
        assert_eq!(source["format"], format);
        assert_eq!(source["model_type"], "Unet3D_glob");
        assert_eq!(source["start_epoch"], 7.0);
        assert_eq!(source["best_metric"], 0.053456);
        use sha2::Digest;
        let sha: String = sha2::Sha256::digest(std::fs::read(ckpt(file)).unwrap()).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(source["sha256"], sha.as_str(), "{file}: sha256 of the source");
        // every Adam moment PyTorch holds, exactly, under the parameter's name
        let mut n = 0;
        for (name, _, want) in &adam {
            let (kind, param) = name.split_once('.').unwrap();
            let key = format!("{}.{param}", if kind == "exp_avg" { "adam.m" } else { "adam.v" });
            assert!(same_bits(&w.get(&key).unwrap(), want), "{file}: {key}");
            n += 1;
        }
        assert!(n > 400, "{file}: {n} moments");
        // train --init continues the run: its step, epoch and moments
        let (start, fresh) = Start::from_weights(&w, 0).unwrap();
        assert!(fresh.is_empty());
        let a = start.adam.expect("Adam state");
        assert_eq!((start.epoch, a.step), (7, 2), "{file}: epoch and Adam step");
        let i = start.params.idx("layer1.blocks.0.conv3.0.weight").unwrap();
        let want = &adam.iter().find(|t| t.0 == "exp_avg_sq.layer1.blocks.0.conv3.0.weight").unwrap().2;
        assert!(same_bits(a.v[i].as_ref().unwrap(), want));
        assert!(a.m[start.params.idx("ConBR0.conv1.weight").unwrap()].is_none(), "ConBR0 never had a gradient");
    }
}

#[test]
fn bare_state_dicts_import() {
    let w = check_import("tiny_state_dict.pth", "tiny", &ImportOptions::default());
    assert!(!w.meta.contains_key("optimizer"));
    let w = check_import("readme_state_dict_legacy.pth", "readme", &readme_opts());
    assert_eq!(w.config.head, Head::Sigmoid, "two output channels: a sigmoid head");
}

#[test]
fn what_shapes_cannot_tell_comes_from_flags() {
    // the readme network read without its flags: shapes give widths etc., the defaults the rest
    let im = import(&ckpt("readme_state_dict_legacy.pth"), &ImportOptions::default()).unwrap();
    let want = Config { widths: [8, 16, 32, 64, 128], trans_feature: 8, head: Head::Sigmoid, out_channels: 2, ..Config::default() };
    assert_eq!(im.config, want);
    let e = import(&ckpt("readme_state_dict_legacy.pth"), &ImportOptions { head: Some(Head::Distance), ..ImportOptions::default() }).err().unwrap().to_string();
    assert!(e.contains("2 output channels"), "{e}");
}

/// The CLI end to end, and the malicious pickles (os.system via __reduce__, which the generating
/// script shows creates PWNED when Python loads them) refused by name with nothing run.
#[test]
fn cli_imports_and_refuses_a_pickle_that_would_run_a_command() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny.safetensors");
    let r = Command::new(env!("CARGO_BIN_EXE_deepis")).args(["import", ckpt("tiny_trainer_legacy.pth.tar").to_str().unwrap(), "-o", out.to_str().unwrap()]).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    Weights::load(&out).unwrap();
    for file in ["malicious.pth", "malicious_legacy.pth"] {
        let out = dir.path().join("evil.safetensors");
        let r = Command::new(env!("CARGO_BIN_EXE_deepis")).current_dir(dir.path()).args(["import", ckpt(file).to_str().unwrap(), "-o", out.to_str().unwrap()]).output().unwrap();
        let err = String::from_utf8_lossy(&r.stderr);
        println!("{file}: {err}");
        assert_eq!(r.status.code(), Some(1), "{file}");
        assert!(err.contains("posix.system") && err.contains("refused"), "{file}: {err}");
        assert!(!dir.path().join("PWNED").exists() && !out.exists(), "{file}: something was run or written");
    }
}

/// Random mutations (byte changes, insertions, truncations) of every test checkpoint: each import
/// ends in a clear error or a valid result, never a panic.
#[test]
fn mutated_checkpoints_never_panic() {
    let mut rng = Rng::new(14);
    let dir = tempfile::tempdir().unwrap();
    let files = ["tiny_trainer.pth.tar", "tiny_trainer_legacy.pth.tar", "tiny_state_dict.pth", "readme_state_dict_legacy.pth", "malicious_legacy.pth"];
    let (mut errors, mut ok) = (0, 0);
    for file in files {
        let orig = std::fs::read(ckpt(file)).unwrap();
        for k in 0..150 {
            let mut b = orig.clone();
            // the legacy files' pickles are in the first few kB: aim there half of the time
            let span = if k % 2 == 0 { b.len().min(4096) } else { b.len() };
            match k % 5 {
                0 => b.truncate(rng.below(b.len() as u64) as usize),
                1 => b.insert(rng.below(span as u64) as usize, rng.below(256) as u8),
                _ => {
                    for _ in 0..1 + rng.below(4) {
                        let i = rng.below(span as u64) as usize;
                        b[i] = rng.below(256) as u8;
                    }
                }
            }
            let p = dir.path().join("m.pth");
            std::fs::write(&p, &b).unwrap();
            match std::panic::catch_unwind(|| import(&p, &ImportOptions::default()).map(|_| ()).map_err(|e| e.to_string())) {
                Ok(Ok(())) => ok += 1,
                Ok(Err(e)) => {
                    assert!(!e.is_empty());
                    errors += 1
                }
                Err(_) => panic!("{file}: mutation {k} panicked"),
            }
        }
    }
    println!("{} mutations: {errors} refused with an error, {ok} still valid", errors + ok);
    assert!(errors > 300, "the mutations should mostly break the files");
}

/// `deepis train --init` of an imported trainer checkpoint continues that run: epoch 8 after the
/// checkpoint's 7, Adam step 3 after its 2, and the update is Adam's from the imported moments
/// (a fresh Adam gives other weights).
#[test]
fn train_init_continues_the_imported_run() {
    use deepis::train::data::Sample;
    use deepis::train::loss::loss_weights;
    use deepis::train::run::{load_checkpoint, train, TrainOptions};
    let im = import(&ckpt("tiny_trainer.pth.tar"), &ImportOptions::default()).unwrap();
    let w = Weights::from_bytes(im.to_bytes().unwrap(), "tiny").unwrap();
    let sample = Sample { name: "tiny".into(), input: read_5d(&data("tiny", "input.npy")), target: read_5d(&data("tiny", "target.npy")) };
    let opts = TrainOptions { epochs: 8, batch: 1, val_fraction: 0.0, augment: false, dropout: 0.0, ..TrainOptions::default() };
    let b = CpuBackend::new();
    let run = tempfile::tempdir().unwrap();
    let (start, _) = Start::from_weights(&w, 0).unwrap();
    let rep = train(&b, start, std::slice::from_ref(&sample), run.path(), opts.clone(), false, None, false).unwrap();
    assert_eq!(rep.log.iter().map(|l| (l.epoch, l.steps)).collect::<Vec<_>>(), vec![(8, 3)]);
    let (after, _, state) = load_checkpoint(&rep.last).unwrap();
    assert_eq!((state.epoch, state.adam_step), (8, 3));
    // the expected update: the imported moments, one Adam step with the epoch-7 loss weights
    let (mut start, _) = Start::from_weights(&w, 0).unwrap();
    let step = deepis::train::train_step(&b, &start.params, &sample.input, &sample.target, None, loss_weights(7), None).unwrap();
    let mut adam = start.adam.take().unwrap();
    adam.lr = opts.lr;
    adam.update(&mut start.params, &step.grads).unwrap();
    let name = "layer1.blocks.0.conv3.0.weight";
    assert!(same_bits(after.get(name).unwrap(), start.params.get(name).unwrap()), "{name}: not Adam's update from the imported state");
    let fresh = tempfile::tempdir().unwrap();
    let (s, _) = Start::from_weights(&w, 0).unwrap();
    let rep = train(&b, s.params, std::slice::from_ref(&sample), fresh.path(), TrainOptions { epochs: 1, ..opts }, false, None, false).unwrap();
    let (other, _, _) = load_checkpoint(&rep.last).unwrap();
    assert!(!same_bits(other.get(name).unwrap(), after.get(name).unwrap()), "a fresh Adam gives the same update: the moments were not used");
    // --epochs is the total: a run that has done 7 epochs needs more than 7
    let (s, _) = Start::from_weights(&w, 0).unwrap();
    let e = train(&b, s, std::slice::from_ref(&sample), tempfile::tempdir().unwrap().path(), TrainOptions { epochs: 7, ..TrainOptions::default() }, false, None, false).err().unwrap();
    assert!(e.to_string().contains("completed 7 epochs"), "{e}");
}

/// Random streams of the opcodes the reader knows (and some it does not), with random operands:
/// the unpickler returns a value or an error, never panics or allocates what the bytes cannot hold.
#[test]
fn random_pickles_never_panic() {
    use deepis::import::pickle::parse;
    const OPS: &[u8] = b"\x80\x95.(})]t\x85\x86\x87qr\x94hjJKM\x8a\x8bGN\x88\x89\x8cX\x8dUTCB\x8esuaec\x93Rb\x5101200xyz";
    let mut rng = Rng::new(7);
    let (mut ok, mut errs) = (0, 0);
    for _ in 0..20_000 {
        let mut b = vec![0x80, 2];
        for _ in 0..rng.below(40) {
            b.push(OPS[rng.below(OPS.len() as u64) as usize]);
            for _ in 0..rng.below(5) {
                b.push(rng.below(256) as u8);
            }
        }
        b.push(b'.');
        match std::panic::catch_unwind(|| parse(&b, 0).map(|_| ())) {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                assert!(!e.0.is_empty());
                errs += 1
            }
            Err(_) => panic!("panicked on {b:?}"),
        }
    }
    println!("20000 random pickles: {ok} parsed, {errs} refused");
    assert!(ok > 0 && errs > 0);
}

/// Through the binary: `train --init` of an imported trainer checkpoint continues its run (so
/// --epochs, the total, must exceed its 7 epochs), and `--fresh-optimizer` fine-tunes from epoch 0.
#[test]
fn cli_train_init_continues_or_starts_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("tiny.safetensors");
    let r = Command::new(env!("CARGO_BIN_EXE_deepis")).args(["import", ckpt("tiny_trainer.pth.tar").to_str().unwrap(), "-o", w.to_str().unwrap()]).output().unwrap();
    assert!(r.status.success());
    let data_dir = dir.path().join("data");
    std::fs::create_dir(&data_dir).unwrap();
    for (f, out) in [("input.npy", "cell_input.npy"), ("target.npy", "cell_target.npy")] {
        let (dims, v) = read_npy(&data("tiny", f));
        deepis::io::write_npy(&data_dir.join(out), &dims[2..], &v).unwrap();
    }
    let train = |extra: &[&str], run: &str| {
        Command::new(env!("CARGO_BIN_EXE_deepis")).args(["train", "--data", data_dir.to_str().unwrap(), "--init", w.to_str().unwrap(), "-o"]).arg(dir.path().join(run)).args(["--batch", "1"]).args(extra).output().unwrap()
    };
    let r = train(&["--epochs", "3"], "a");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && err.contains("completed 7 epochs"), "{err}");
    let r = train(&["--epochs", "8"], "b");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success() && err.contains("after epoch 7 (Adam step 2)") && err.contains("epoch 8/8"), "{err}");
    let r = train(&["--epochs", "1", "--fresh-optimizer"], "c");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success() && err.contains("epoch 1/1") && !err.contains("continuing"), "{err}");
}
