//! `shoal up` as users run it: separate processes on loopback, the gateway, `shoal status`,
//! an agent killed, Ctrl-C stopping everything; and the official OpenAI Python client against
//! the default model.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

fn free_port() -> u16 {
    shoal_net::faults::free_port().unwrap()
}

/// Every process whose command line mentions `marker` (the test's own cluster directory).
fn processes_mentioning(marker: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(marker) && pid != std::process::id() {
            found.push((pid, cmd));
        }
    }
    found
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid} failed");
}

struct Up {
    child: Child,
    dir: PathBuf,
    api: String,
    grpc: String,
    lines: mpsc::Receiver<String>,
}

impl Up {
    /// Starts `shoal up` and waits for its ready line.
    fn start(home: &Path, model: &str, agents: usize) -> Up {
        Up::start_with(home, model, agents, &[])
    }

    /// `shoal up` with `extra` arguments.
    fn start_with(home: &Path, model: &str, agents: usize, extra: &[&str]) -> Up {
        let dir = home.join("cluster");
        let (api, grpc) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        let mut child = Command::new(SHOAL)
            .args([
                "up",
                &format!("--agents={agents}"),
                &format!("--model={model}"),
                &format!("--listen={api}"),
                &format!("--grpc-listen={grpc}"),
                "--lease-ms=1500",
                &format!("--cluster-dir={}", dir.display()),
            ])
            .args(extra)
            .env("SHOAL_HOME", home)
            .env_remove("SHOAL_MODEL_KEY")
            .env_remove("SHOAL_MODEL_KEY_FILE")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let up = Up {
            child,
            dir,
            api,
            grpc,
            lines,
        };
        let deadline = Instant::now() + Duration::from_secs(240);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match up.lines.recv_timeout(left) {
                Ok(line) if line == "ready" => break,
                Ok(line) => eprintln!("shoal up: {line}"),
                Err(e) => panic!("shoal up printed no ready line: {e}"),
            }
        }
        up
    }

    fn base(&self) -> String {
        format!("http://{}/v1", self.api)
    }

    fn marker(&self) -> String {
        self.dir.display().to_string()
    }

    /// Ctrl-C, then every process of the cluster must be gone.
    fn stop(mut self) {
        signal(self.child.id(), "-INT");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "shoal up exited with {status}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "shoal up did not stop after Ctrl-C"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let left = processes_mentioning(&self.marker());
        assert!(left.is_empty(), "processes left behind: {left:?}");
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            for (pid, _) in processes_mentioning(&self.marker()) {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
        }
    }
}

fn post(client: &reqwest::blocking::Client, url: &str, body: &Value) -> (u16, Value) {
    let r = client.post(url).json(body).send().unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

#[test]
fn shoal_up_serves_survives_a_killed_agent_and_stops_on_ctrl_c() {
    let home = tempfile::tempdir().unwrap();
    let model = home.path().join("tiny.gguf");
    shoal_synth::write_model(&shoal_synth::SynthSpec::tiny_llama(), &model).unwrap();
    let up = Up::start(home.path(), model.to_str().unwrap(), 2);
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let chat = format!("{}/chat/completions", up.base());
    let body = json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8,
        "temperature": 0
    });
    let (status, first) = post(&client, &chat, &body);
    assert_eq!(status, 200, "{first}");

    // `shoal status` and `shoal plan` reach the Admin service over mTLS with an operator
    // certificate.
    let (coordinator, cluster_dir) = (
        format!("--coordinator={}", up.grpc),
        format!("--cluster-dir={}", up.dir.display()),
    );
    let admin = |command: &str| run_ok(home.path(), &[command, &coordinator, &cluster_dir]);
    let text = admin("status");
    for name in ["agent-1", "agent-2"] {
        assert!(text.contains(name), "{text}");
    }
    assert!(text.contains("alive"), "{text}");
    let plan = admin("plan");
    assert!(
        plan.contains("model tiny") && plan.contains("tok/s"),
        "{plan}"
    );

    // Kill one agent process outright: requests keep succeeding.
    let victim = processes_mentioning(&up.marker())
        .into_iter()
        .find(|(_, cmd)| cmd.contains("--name=agent-1"))
        .expect("agent-1's process");
    signal(victim.0, "-KILL");
    for _ in 0..4 {
        let (status, again) = post(&client, &chat, &body);
        assert_eq!(status, 200, "{again}");
        assert_eq!(
            again["choices"][0]["message"]["content"],
            first["choices"][0]["message"]["content"]
        );
    }
    up.stop();
}

fn run_ok(home: &Path, args: &[&str]) -> String {
    let out = Command::new(SHOAL)
        .args(args)
        .env("SHOAL_HOME", home)
        .env_remove("SHOAL_MODEL_KEY")
        .env_remove("SHOAL_MODEL_KEY_FILE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "shoal {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_cluster_serves_an_encrypted_model_and_answers_like_the_plain_one() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let model = h.join("tiny.gguf");
    shoal_synth::write_model(&shoal_synth::SynthSpec::tiny_llama(), &model).unwrap();
    let (model_s, key, enc) = (
        model.to_str().unwrap(),
        h.join("model.key"),
        h.join("tiny.gguf.enc"),
    );
    let (key_s, enc_s) = (key.to_str().unwrap(), enc.to_str().unwrap());
    run_ok(h, &["model", "keygen", "--out", key_s]);
    run_ok(
        h,
        &[
            "model",
            "encrypt",
            model_s,
            "--key-file",
            key_s,
            "--manifest",
        ],
    );
    let prompt = "the quick brown fox";
    let plain = run_ok(
        h,
        &[
            "generate",
            "--model",
            model_s,
            "--prompt",
            prompt,
            "--max-tokens",
            "12",
            "--threads",
            "1",
        ],
    );

    // Without the key the coordinator refuses to start, and says how to give one.
    let out = Command::new(SHOAL)
        .args(["coordinator", "--model", enc_s, "--listen=127.0.0.1:0"])
        .env("SHOAL_HOME", h)
        .env_remove("SHOAL_MODEL_KEY")
        .env_remove("SHOAL_MODEL_KEY_FILE")
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        e.contains("encrypted") && e.contains("--model-key-file"),
        "{e}"
    );

    // With it, the coordinator plans the encrypted file and the agent serves it; the model
    // keeps its plain name.
    let key_arg = format!("--model-key-file={key_s}");
    let up = Up::start_with(h, enc_s, 1, &[&key_arg]);
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let (status, answer) = post(
        &client,
        &format!("{}/completions", up.base()),
        &json!({"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(status, 200, "{answer}");
    let text = answer["choices"][0]["text"].as_str().unwrap();
    assert_eq!(text.trim_end(), plain.trim_end(), "{answer}");
    up.stop();
}

fn python_with_openai() -> Option<String> {
    let py = std::env::var("SHOAL_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let ok = Command::new(&py)
        .args(["-c", "import openai"])
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(py)
}

fn default_model() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let path = PathBuf::from(home).join(".cache/shoal/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    path.exists().then_some(path)
}

#[test]
fn the_official_openai_client_works_against_shoal_up() {
    let in_ci = std::env::var_os("CI").is_some();
    let (Some(py), Some(model)) = (python_with_openai(), default_model()) else {
        assert!(
            !in_ci,
            "CI must have the openai package and the default model (scripts/test.sh installs them)"
        );
        eprintln!("SKIPPED: needs python3 with `openai` and the default model");
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let models = home.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    std::os::unix::fs::symlink(&model, models.join(model.file_name().unwrap())).unwrap();
    let up = Up::start(home.path(), "smollm2-135m-instruct", 3);
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts/reference/openai_client_check.py");
    let out = Command::new(py)
        .arg(script)
        .arg(up.base())
        .args(["--model", "smollm2-135m-instruct"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the openai client checks failed");
    up.stop();
}
