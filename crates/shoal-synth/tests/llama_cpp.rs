//! llama.cpp itself (through llama-cpp-python) loads the tiny models and generates from them:
//! the strongest check that tensor names, shapes, types and metadata are what it expects.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::path::Path;
use std::process::Command;

use shoal_synth::{SynthSpec, write_model};

#[test]
fn llama_cpp_loads_tiny_models_and_generates() {
    let probe = Command::new("python3")
        .args(["-c", "import llama_cpp"])
        .output();
    match probe {
        Ok(out) if out.status.success() => {}
        other => panic!(
            "this test needs python3 with llama-cpp-python (run scripts/setup-python.sh): {other:?}"
        ),
    }
    let dir = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for spec in [SynthSpec::tiny_llama(), SynthSpec::tiny_qwen2()] {
        let path = dir.path().join(format!("{}.gguf", spec.name));
        write_model(&spec, &path).unwrap();
        paths.push(path);
    }
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/reference/check_synth_loads.py");
    let out = Command::new("python3")
        .arg(&script)
        .args(&paths)
        .env("OMP_WAIT_POLICY", "PASSIVE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "llama.cpp refused a model:\n{stdout}\n{stderr}"
    );
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (line, arch) in lines.iter().zip(["llama", "qwen2"]) {
        assert_eq!(line["arch"], arch);
        assert_eq!(line["n_vocab"], 512);
        assert_eq!(line["generated"].as_array().unwrap().len(), 8);
    }
}
