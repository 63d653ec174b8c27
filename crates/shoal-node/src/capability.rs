//! What this machine can do: cores, memory, CPU features, battery and temperature read from
//! `/proc` and `/sys` (cgroup v2 limits applied, so a container reports its own limits), and a
//! short micro-benchmark of each model on its real shapes.
//!
//! Everything here is blocking (file reads, forward passes): callers on an async runtime run
//! it with `spawn_blocking`. Files that are missing or unreadable leave their figure out rather
//! than failing: a laptop has a battery, a server does not.

use crate::config::ModelFile;
use shoal_model::{
    Model, ModelError, Prompt, SeqStep, ShardInput, ShardOptions, ShardRuntime, ThreadPool,
};
use shoal_proto::v1::{Capability, ModelSpeed};
use shoal_types::{LayerRange, ModelId, SeqId};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Prompt tokens prefilled before the timed decode steps.
const BENCH_PROMPT_TOKENS: usize = 4;
/// Timed batch-1 decode steps per runtime (two runtimes: 16 steps in all).
const BENCH_DECODE_STEPS: usize = 8;
/// Context the benchmark runtimes allocate for (small: only a few positions are used).
const BENCH_CONTEXT: u32 = 64;

/// Why a model could not be benchmarked.
#[derive(Debug, thiserror::Error)]
pub enum CapabilityError {
    /// The model could not be opened or run.
    #[error("benchmarking model {model}")]
    Model {
        /// The model.
        model: ModelId,
        /// What failed.
        #[source]
        source: ModelError,
    },
}

/// How to measure a node.
#[derive(Debug, Clone)]
pub struct CapabilityOptions {
    /// Compute threads the node runs shards with (the benchmark uses as many).
    pub threads: usize,
    /// Reported as the available memory instead of the measured figure.
    pub memory_budget: Option<u64>,
    /// Whether to benchmark each model (otherwise `speeds` is empty).
    pub benchmark: bool,
}

/// Measures this machine and, when asked, every model in `models`. Models that fail to open or
/// run are logged and left out of `speeds`.
pub fn measure_capability(models: &[ModelFile], opts: &CapabilityOptions) -> Capability {
    let mut cap = host_capability(&HostProbe::default(), opts.threads, opts.memory_budget);
    if opts.benchmark {
        for file in models {
            let speed = Model::open(&file.path)
                .map_err(|source| CapabilityError::Model {
                    model: file.id.clone(),
                    source,
                })
                .and_then(|m| benchmark_model(&m, &file.id, opts.threads));
            match speed {
                Ok(s) => cap.speeds.push(s),
                Err(e) => tracing::warn!(error = %error_chain(&e), "model benchmark failed"),
            }
        }
    }
    cap
}

/// The machine's figures (no model speeds), read through `probe`.
pub fn host_capability(
    probe: &HostProbe,
    threads: usize,
    memory_budget: Option<u64>,
) -> Capability {
    let mem = probe.memory();
    let (mut total, mut available) = mem.map_or((0, 0), |m| (m.total, m.available));
    if let Some(budget) = memory_budget {
        // Imitates a weaker device: the budget is what there is.
        available = budget;
        total = if total == 0 {
            budget
        } else {
            total.min(budget)
        };
    }
    Capability {
        cores: probe.cores(),
        memory_total_bytes: total,
        memory_available_bytes: available,
        cpu_features: cpu_features(),
        speeds: Vec::new(),
        battery_percent: probe.battery_percent(),
        temperature_celsius: probe.temperature_celsius(),
        threads: u32::try_from(threads).unwrap_or(u32::MAX),
    }
}

/// The error and its sources on one line, for logs.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// CPU features the kernels care about, as lower-case names.
pub fn cpu_features() -> Vec<String> {
    #[allow(unused_mut)] // empty on architectures without detection
    let mut out: Vec<&str> = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        let detected = [
            ("sse4.2", std::is_x86_feature_detected!("sse4.2")),
            ("avx", std::is_x86_feature_detected!("avx")),
            ("avx2", std::is_x86_feature_detected!("avx2")),
            ("fma", std::is_x86_feature_detected!("fma")),
            ("f16c", std::is_x86_feature_detected!("f16c")),
            ("avx512f", std::is_x86_feature_detected!("avx512f")),
            ("avx512bw", std::is_x86_feature_detected!("avx512bw")),
            ("avx512vnni", std::is_x86_feature_detected!("avx512vnni")),
            ("avxvnni", std::is_x86_feature_detected!("avxvnni")),
        ];
        out.extend(detected.iter().filter(|(_, on)| *on).map(|(n, _)| *n));
    }
    #[cfg(target_arch = "aarch64")]
    {
        let detected = [
            ("neon", std::arch::is_aarch64_feature_detected!("neon")),
            (
                "dotprod",
                std::arch::is_aarch64_feature_detected!("dotprod"),
            ),
            ("fp16", std::arch::is_aarch64_feature_detected!("fp16")),
            ("i8mm", std::arch::is_aarch64_feature_detected!("i8mm")),
        ];
        out.extend(detected.iter().filter(|(_, on)| *on).map(|(n, _)| *n));
    }
    out.into_iter().map(str::to_owned).collect()
}

/// Weight bytes of one transformer layer: every `blk.*` tensor in the file, averaged over the
/// layers.
pub fn layer_bytes(model: &Model) -> u64 {
    let n = u64::from(model.config().n_layers.max(1));
    let total: u64 = model
        .file()
        .tensors()
        .iter()
        .filter(|t| t.name.starts_with("blk."))
        .map(|t| t.n_bytes as u64)
        .sum();
    total / n
}

/// Times batch-1 decoding of `model` with `threads` threads: the whole model, and a shard of
/// its first half returning hidden states. The half gives the seconds per layer; what the whole
/// takes beyond its layers is the output head. The two are stepped in turn, so a load that
/// comes and goes while they run (other agents of the machine benchmarking at start) weighs on
/// both alike instead of showing up as a slow or fast head.
pub fn benchmark_model(
    model: &Model,
    id: &ModelId,
    threads: usize,
) -> Result<ModelSpeed, CapabilityError> {
    let err = |source| CapabilityError::Model {
        model: id.clone(),
        source,
    };
    let cfg = model.config();
    let n = cfg.n_layers.max(1);
    let pool = Arc::new(ThreadPool::new(threads.max(1)).map_err(|e| err(ModelError::from(e)))?);
    let opts = ShardOptions {
        kv_budget: None,
        context: Some(BENCH_CONTEXT),
    };
    let prompt = bench_prompt(model);
    // Shards borrow their weights from the mapped file: two at once cost two small KV caches.
    let mut whole = model.whole(pool.clone(), opts.clone()).map_err(err)?;
    let k = if n >= 2 { n / 2 } else { n };
    let (whole_s, layer_s) = if k < n {
        let range = LayerRange::new(0, k).map_err(|e| err(ModelError::from(e)))?;
        let mut part = model.shard(range, pool, opts).map_err(err)?;
        let mut both: [&mut dyn ShardRuntime; 2] = [&mut whole, &mut part];
        let times = time_decode(&mut both, &prompt).map_err(err)?;
        (times[0], times[1] / f64::from(k))
    } else {
        let mut one: [&mut dyn ShardRuntime; 1] = [&mut whole];
        let times = time_decode(&mut one, &prompt).map_err(err)?;
        (times[0], times[0] / f64::from(n))
    };
    let head_s = (whole_s - layer_s * f64::from(n)).max(0.0);
    let per_token = layer_s * f64::from(n) + head_s;
    Ok(ModelSpeed {
        model_id: id.as_str().to_owned(),
        layer_decode_seconds: layer_s,
        head_seconds: head_s,
        decode_tokens_per_second: if per_token > 0.0 {
            1.0 / per_token
        } else {
            0.0
        },
        layer_bytes: layer_bytes(model),
    })
}

/// A short prompt in the model's own vocabulary.
fn bench_prompt(model: &Model) -> Vec<u32> {
    let mut ids = model
        .encode(&Prompt::Text(
            "The quick brown fox jumps over the lazy dog near the river".into(),
        ))
        .unwrap_or_default();
    ids.truncate(BENCH_PROMPT_TOKENS);
    if ids.is_empty() {
        let vocab = model.tokenizer().vocab_size().max(1) as u32;
        ids = (0..BENCH_PROMPT_TOKENS as u32).map(|i| i % vocab).collect();
    }
    ids
}

/// Seconds per batch-1 decode step of each of `runtimes` (the median step, so one preempted
/// step does not skew it), after a prefill of `prompt` and one untimed step, stepping them in
/// turn: one step of each per round.
fn time_decode(
    runtimes: &mut [&mut dyn ShardRuntime],
    prompt: &[u32],
) -> Result<Vec<f64>, ModelError> {
    let seq = SeqId(1);
    let token = prompt[0];
    let mut times = vec![Vec::with_capacity(BENCH_DECODE_STEPS); runtimes.len()];
    let result = (|| -> Result<(), ModelError> {
        let mut pos = prompt.len() as u32;
        for rt in runtimes.iter_mut() {
            decode_step(&mut **rt, seq, 0, prompt)?;
            decode_step(&mut **rt, seq, pos, &[token])?;
        }
        pos += 1;
        for _ in 0..BENCH_DECODE_STEPS {
            for (rt, t) in runtimes.iter_mut().zip(&mut times) {
                let start = Instant::now();
                decode_step(&mut **rt, seq, pos, &[token])?;
                t.push(start.elapsed().as_secs_f64());
            }
            pos += 1;
        }
        Ok(())
    })();
    for rt in runtimes.iter_mut() {
        rt.release(seq);
    }
    result?;
    Ok(times
        .into_iter()
        .map(|mut t| {
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        })
        .collect())
}

/// Runs `tokens` of sequence `seq` from position `pos` through `rt`.
fn decode_step(
    rt: &mut dyn ShardRuntime,
    seq: SeqId,
    pos: u32,
    tokens: &[u32],
) -> Result<(), ModelError> {
    let batch = [SeqStep {
        seq,
        pos,
        n_tokens: tokens.len() as u32,
        logits: true,
    }];
    rt.forward(&batch, ShardInput::Tokens(tokens)).map(|_| ())
}

/// Memory figures in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// Physical memory (or the container's limit).
    pub total: u64,
    /// Memory that can be used without swapping (within the container's limit).
    pub available: u64,
}

/// Where the host's figures are read from: `/proc` and `/sys` normally, a directory tree in
/// tests.
#[derive(Debug, Clone)]
pub struct HostProbe {
    /// Stands for `/proc`.
    pub proc_root: PathBuf,
    /// Stands for `/sys`.
    pub sys_root: PathBuf,
}

impl Default for HostProbe {
    fn default() -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            sys_root: PathBuf::from("/sys"),
        }
    }
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

impl HostProbe {
    /// CPU cores usable: the scheduler's count, lowered by a cgroup CPU quota.
    pub fn cores(&self) -> u32 {
        let parallel = std::thread::available_parallelism().map_or(1, |n| n.get());
        let quota = self
            .cgroup_dirs()
            .iter()
            .filter_map(|d| read(&d.join("cpu.max")).and_then(|t| parse_cpu_max(&t)))
            .fold(f64::INFINITY, f64::min);
        let quota = quota.min(self.cgroup_v1_cpu_quota().unwrap_or(f64::INFINITY));
        let mut cores = parallel as f64;
        if quota.is_finite() {
            cores = cores.min(quota.ceil().max(1.0));
        }
        cores as u32
    }

    /// Memory from `/proc/meminfo`, limited by a cgroup memory limit when one is set.
    pub fn memory(&self) -> Option<Memory> {
        let mut mem = parse_meminfo(&read(&self.proc_root.join("meminfo"))?)?;
        for dir in self.cgroup_dirs() {
            let Some(limit) = read(&dir.join("memory.max")).and_then(|t| parse_limit(&t)) else {
                continue;
            };
            // Page cache the kernel can drop counts as available, as in MemAvailable.
            let used = read(&dir.join("memory.current"))
                .and_then(|t| t.trim().parse::<u64>().ok())
                .unwrap_or(0);
            let reclaimable = read(&dir.join("memory.stat"))
                .and_then(|t| parse_stat_field(&t, "inactive_file"))
                .unwrap_or(0);
            let free = limit.saturating_sub(used.saturating_sub(reclaimable));
            mem.total = mem.total.min(limit);
            mem.available = mem.available.min(free);
        }
        // cgroup v1 (hosts whose /sys/fs/cgroup is a tmpfs of per-controller mounts): a
        // container sees its own group at the controller's root.
        let v1 = self.sys_root.join("fs/cgroup/memory");
        if let Some(limit) = read(&v1.join("memory.limit_in_bytes")).and_then(|t| parse_limit(&t)) {
            let used = read(&v1.join("memory.usage_in_bytes"))
                .and_then(|t| t.trim().parse::<u64>().ok())
                .unwrap_or(0);
            let reclaimable = read(&v1.join("memory.stat"))
                .and_then(|t| parse_stat_field(&t, "total_inactive_file"))
                .unwrap_or(0);
            // "No limit" is a huge page-aligned number; the min with the machine's total
            // leaves the figures unchanged then.
            let free = limit.saturating_sub(used.saturating_sub(reclaimable));
            mem.total = mem.total.min(limit);
            mem.available = mem.available.min(free);
        }
        Some(mem)
    }

    /// Cores a cgroup v1 CPU quota allows (`cpu.cfs_quota_us / cpu.cfs_period_us`), if set.
    fn cgroup_v1_cpu_quota(&self) -> Option<f64> {
        let dir = self.sys_root.join("fs/cgroup/cpu");
        let quota: i64 = read(&dir.join("cpu.cfs_quota_us"))?.trim().parse().ok()?;
        let period: i64 = read(&dir.join("cpu.cfs_period_us"))?.trim().parse().ok()?;
        (quota > 0 && period > 0).then(|| quota as f64 / period as f64)
    }

    /// Mean charge of the batteries, in percent.
    pub fn battery_percent(&self) -> Option<f32> {
        let dir = self.sys_root.join("class/power_supply");
        let mut values = Vec::new();
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let p = entry.path();
            let is_battery = read(&p.join("type")).is_some_and(|t| t.trim() == "Battery");
            if let Some(v) = is_battery
                .then(|| read(&p.join("capacity")))
                .flatten()
                .and_then(|t| parse_capacity(&t))
            {
                values.push(v);
            }
        }
        (!values.is_empty()).then(|| values.iter().sum::<f32>() / values.len() as f32)
    }

    /// The hottest thermal zone, in degrees Celsius.
    pub fn temperature_celsius(&self) -> Option<f32> {
        let dir = self.sys_root.join("class/thermal");
        std::fs::read_dir(dir)
            .ok()?
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("thermal_zone"))
            .filter_map(|e| read(&e.path().join("temp")).and_then(|t| parse_millidegrees(&t)))
            .reduce(f32::max)
    }

    /// This process's cgroup v2 directory and its ancestors up to the hierarchy's root (a
    /// limit on any of them applies).
    fn cgroup_dirs(&self) -> Vec<PathBuf> {
        let root = self.sys_root.join("fs/cgroup");
        let rel = read(&self.proc_root.join("self/cgroup"))
            .and_then(|t| parse_self_cgroup(&t))
            .unwrap_or_default();
        let mut dirs = Vec::new();
        let mut cur = PathBuf::new();
        dirs.push(root.clone());
        for part in rel.split('/').filter(|p| !p.is_empty() && *p != "..") {
            cur.push(part);
            dirs.push(root.join(&cur));
        }
        dirs
    }
}

/// `MemTotal` and `MemAvailable` (or, on old kernels, free plus buffers plus cache) of
/// `/proc/meminfo`, in bytes.
pub fn parse_meminfo(text: &str) -> Option<Memory> {
    let field = |key: &str| parse_stat_field_kb(text, key);
    let total = field("MemTotal")?;
    let available = field("MemAvailable").unwrap_or_else(|| {
        field("MemFree").unwrap_or(0) + field("Buffers").unwrap_or(0) + field("Cached").unwrap_or(0)
    });
    Some(Memory {
        total,
        available: available.min(total),
    })
}

/// A `Key:   123 kB` line of a `/proc` file, in bytes.
fn parse_stat_field_kb(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, rest) = line.split_once(':')?;
        if k.trim() != key {
            return None;
        }
        let mut parts = rest.split_whitespace();
        let v: u64 = parts.next()?.parse().ok()?;
        match parts.next() {
            Some("kB") => v.checked_mul(1024),
            None => Some(v),
            Some(_) => None,
        }
    })
}

/// A `key value` line of a cgroup `*.stat` file.
pub fn parse_stat_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Cores granted by a cgroup v2 `cpu.max` (`<quota> <period>` or `max <period>`).
pub fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut parts = text.split_whitespace();
    let quota = parts.next()?;
    let period: f64 = parts.next().map_or(Some(100_000.0), |p| p.parse().ok())?;
    if quota == "max" || period <= 0.0 {
        return None;
    }
    let quota: f64 = quota.parse().ok()?;
    (quota > 0.0).then_some(quota / period)
}

/// A cgroup v2 limit file (`memory.max`): a byte count, or `max` for none.
pub fn parse_limit(text: &str) -> Option<u64> {
    let t = text.trim();
    if t == "max" { None } else { t.parse().ok() }
}

/// The cgroup v2 path of `/proc/self/cgroup` (the `0::/path` line).
pub fn parse_self_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_owned())
}

/// A battery's `capacity` file, in percent.
pub fn parse_capacity(text: &str) -> Option<f32> {
    let v: f32 = text.trim().parse().ok()?;
    (0.0..=100.0).contains(&v).then_some(v)
}

/// A thermal zone's `temp` file (millidegrees Celsius), in degrees; implausible readings
/// (sensors that report -273 or garbage) are dropped.
pub fn parse_millidegrees(text: &str) -> Option<f32> {
    let v: i64 = text.trim().parse().ok()?;
    let c = v as f32 / 1000.0;
    (-60.0..=200.0).contains(&c).then_some(c)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       16303428 kB\nMemFree:         1014808 kB\nMemAvailable:    9876543 kB\nBuffers:          265344 kB\nCached:          8124568 kB\nSwapCached:            0 kB\n";

    #[test]
    fn meminfo_reads_total_and_available() {
        let m = parse_meminfo(MEMINFO).unwrap();
        assert_eq!(m.total, 16_303_428 * 1024);
        assert_eq!(m.available, 9_876_543 * 1024);
        // Old kernels have no MemAvailable: free + buffers + cached.
        let old = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 20 kB\nCached: 300 kB\n";
        let m = parse_meminfo(old).unwrap();
        assert_eq!(m.available, 420 * 1024);
        assert_eq!(parse_meminfo("garbage"), None);
        assert_eq!(parse_meminfo("MemTotal: lots kB\n"), None);
    }

    #[test]
    fn cgroup_files_parse() {
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max("200000 100000\n"), Some(2.0));
        assert_eq!(parse_cpu_max("50000 100000"), Some(0.5));
        assert_eq!(parse_cpu_max("x 100000"), None);
        assert_eq!(parse_cpu_max("100 0"), None);
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("536870912\n"), Some(536_870_912));
        assert_eq!(parse_limit("-1"), None);
        assert_eq!(
            parse_self_cgroup("0::/system.slice/docker-abc.scope\n"),
            Some("/system.slice/docker-abc.scope".into())
        );
        assert_eq!(parse_self_cgroup("12:cpu,cpuacct:/x\n"), None);
        let stat = "anon 1000\nfile 5000\ninactive_file 4096\nactive_file 904\n";
        assert_eq!(parse_stat_field(stat, "inactive_file"), Some(4096));
        assert_eq!(parse_stat_field(stat, "inactive"), None);
    }

    #[test]
    fn sysfs_values_parse() {
        assert_eq!(parse_capacity("87\n"), Some(87.0));
        assert_eq!(parse_capacity("187\n"), None);
        assert_eq!(parse_capacity("full"), None);
        assert_eq!(parse_millidegrees("48500\n"), Some(48.5));
        assert_eq!(parse_millidegrees("-273000"), None);
        assert_eq!(parse_millidegrees("n/a"), None);
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn a_container_reports_its_limits_and_the_devices_it_has() {
        let dir = tempfile::tempdir().unwrap();
        let probe = HostProbe {
            proc_root: dir.path().join("proc"),
            sys_root: dir.path().join("sys"),
        };
        write(&probe.proc_root.join("meminfo"), MEMINFO);
        write(&probe.proc_root.join("self/cgroup"), "0::/box\n");
        let cg = probe.sys_root.join("fs/cgroup");
        write(&cg.join("cpu.max"), "max 100000\n");
        write(&cg.join("box/cpu.max"), "50000 100000\n");
        write(&cg.join("box/memory.max"), "1073741824\n");
        write(&cg.join("box/memory.current"), "536870912\n");
        write(&cg.join("box/memory.stat"), "inactive_file 268435456\n");
        let ps = probe.sys_root.join("class/power_supply");
        write(&ps.join("AC/type"), "Mains\n");
        write(&ps.join("AC/capacity"), "5\n");
        write(&ps.join("BAT0/type"), "Battery\n");
        write(&ps.join("BAT0/capacity"), "60\n");
        write(&ps.join("BAT1/type"), "Battery\n");
        write(&ps.join("BAT1/capacity"), "80\n");
        let th = probe.sys_root.join("class/thermal");
        write(&th.join("thermal_zone0/temp"), "41000\n");
        write(&th.join("thermal_zone1/temp"), "63500\n");
        write(&th.join("cooling_device0/temp"), "99000\n");

        assert_eq!(probe.cores(), 1, "half a CPU rounds up to one core");
        let mem = probe.memory().unwrap();
        assert_eq!(mem.total, 1 << 30);
        // 1 GiB limit, 512 MiB used of which 256 MiB is reclaimable cache.
        assert_eq!(mem.available, (1 << 30) - (256 << 20));
        assert_eq!(probe.battery_percent(), Some(70.0));
        assert_eq!(probe.temperature_celsius(), Some(63.5));

        let cap = host_capability(&probe, 3, Some(100 << 20));
        assert_eq!(cap.memory_available_bytes, 100 << 20);
        assert_eq!(cap.memory_total_bytes, 100 << 20);
        assert_eq!(cap.threads, 3);
        assert_eq!(cap.cores, 1);
    }

    #[test]
    fn a_cgroup_v1_container_reports_its_limits() {
        let dir = tempfile::tempdir().unwrap();
        let probe = HostProbe {
            proc_root: dir.path().join("proc"),
            sys_root: dir.path().join("sys"),
        };
        write(&probe.proc_root.join("meminfo"), MEMINFO);
        let cg = probe.sys_root.join("fs/cgroup");
        write(&cg.join("cpu/cpu.cfs_quota_us"), "25000\n");
        write(&cg.join("cpu/cpu.cfs_period_us"), "100000\n");
        write(&cg.join("memory/memory.limit_in_bytes"), "402653184\n");
        write(&cg.join("memory/memory.usage_in_bytes"), "134217728\n");
        write(
            &cg.join("memory/memory.stat"),
            "cache 1\ntotal_inactive_file 67108864\n",
        );
        assert_eq!(probe.cores(), 1, "a quarter of a CPU rounds up to one core");
        let mem = probe.memory().unwrap();
        assert_eq!(mem.total, 384 << 20);
        assert_eq!(mem.available, (384 << 20) - (64 << 20));

        // An unlimited v1 group (the kernel writes a huge number) leaves the host's figures.
        write(
            &cg.join("memory/memory.limit_in_bytes"),
            "9223372036854771712\n",
        );
        write(&cg.join("cpu/cpu.cfs_quota_us"), "-1\n");
        let host = parse_meminfo(MEMINFO).unwrap();
        assert_eq!(probe.memory().unwrap().total, host.total);
    }

    #[test]
    fn a_bare_host_reports_no_battery_or_temperature() {
        let dir = tempfile::tempdir().unwrap();
        let probe = HostProbe {
            proc_root: dir.path().join("proc"),
            sys_root: dir.path().join("sys"),
        };
        assert_eq!(probe.memory(), None);
        assert_eq!(probe.battery_percent(), None);
        assert_eq!(probe.temperature_celsius(), None);
        assert!(probe.cores() >= 1);
        let cap = host_capability(&probe, 1, None);
        assert_eq!(cap.battery_percent, None);
        assert_eq!(cap.temperature_celsius, None);
    }

    #[test]
    fn this_machine_measures_sensibly() {
        let cap = host_capability(&HostProbe::default(), 2, None);
        assert!(cap.cores >= 1);
        if Path::new("/proc/meminfo").exists() {
            assert!(cap.memory_total_bytes > 0);
            assert!(cap.memory_available_bytes <= cap.memory_total_bytes);
        }
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            cap.cpu_features.contains(&"avx2".to_owned()),
            std::is_x86_feature_detected!("avx2")
        );
    }

    #[test]
    fn a_model_benchmark_splits_a_decode_step_into_its_layers_and_head() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let spec = shoal_synth::SynthSpec::tiny_llama();
        shoal_synth::write_model(&spec, &path).unwrap();
        let model = Model::open(&path).unwrap();
        let s = benchmark_model(&model, &ModelId::new("tiny"), 1).unwrap();
        assert_eq!(s.model_id, "tiny");
        assert!(
            s.layer_decode_seconds > 0.0 && s.layer_decode_seconds.is_finite(),
            "{s:?}"
        );
        assert!(s.head_seconds >= 0.0 && s.head_seconds.is_finite(), "{s:?}");
        // The whole step is its layers plus the head.
        let n = f64::from(model.config().n_layers);
        let per_token = n * s.layer_decode_seconds + s.head_seconds;
        assert!(
            (s.decode_tokens_per_second * per_token - 1.0).abs() < 1e-9,
            "{s:?}"
        );
        assert_eq!(s.layer_bytes, layer_bytes(&model));
    }
}
