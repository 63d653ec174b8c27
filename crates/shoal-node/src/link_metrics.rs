//! What this node's pipeline stage links carry, counted as frames cross them.
//!
//! Every frame a stage link sends or receives is counted by the neighbour it is exchanged
//! with ([`Peer`]: the previous stage or the next one) and its direction (`sent` or
//! `received`): its encoded size, and for steps the hidden-state rows it carries. The hop
//! between two stages is what the first exchanges with its next peer (equivalently, what the
//! second exchanges with its previous one). Every step
//! names the moment its sender handed it to the link (`sent_unix_micros`); the receiver
//! records its own clock minus that moment as the **hop latency**: queueing on the sender,
//! encoding, TLS, the network and decoding up to the moment the stage reads the step. Between
//! two machines the figure also contains the skew between their clocks (negative differences
//! count as zero), so it is exact on one host and as good as the clock sync across hosts.
//!
//! The figures are readable in-process ([`LinkMetrics::sent`], [`LinkMetrics::hop_latency`])
//! and exposed on the agent's `/metrics`.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use shoal_proto::v1;
use shoal_proto::v1::stage_frame::Frame as WireFrame;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Encoded bytes of stage-link frames, by peer and direction (counter).
pub const NODE_STAGE_LINK_BYTES_TOTAL: &str = "shoal_node_stage_link_bytes_total";
/// Stage-link frames, by peer and direction (counter).
pub const NODE_STAGE_LINK_FRAMES_TOTAL: &str = "shoal_node_stage_link_frames_total";
/// Steps (hidden states of one micro-batch) over stage links, by peer and direction (counter).
pub const NODE_STAGE_LINK_STEPS_TOTAL: &str = "shoal_node_stage_link_steps_total";
/// Hidden-state rows (token positions) over stage links, by peer and direction (counter).
pub const NODE_STAGE_LINK_ROWS_TOTAL: &str = "shoal_node_stage_link_rows_total";
/// Latency of the steps this node received: its clock minus the sender's stamp (histogram).
pub const NODE_STAGE_HOP_LATENCY_SECONDS: &str = "shoal_node_stage_hop_latency_seconds";

/// Every metric name this module exposes.
pub const LINK_NAMES: [&str; 5] = [
    NODE_STAGE_LINK_BYTES_TOTAL,
    NODE_STAGE_LINK_FRAMES_TOTAL,
    NODE_STAGE_LINK_STEPS_TOTAL,
    NODE_STAGE_LINK_ROWS_TOTAL,
    NODE_STAGE_HOP_LATENCY_SECONDS,
];

/// Sub-buckets per doubling of the latency histogram: bucket bounds are 2^(i/8) µs, so a
/// quantile read from it is within about 4.5 % of the true value.
const SUB_BUCKETS: u32 = 8;
/// Doublings covered above 1 µs (2^27 µs is over two minutes; longer hops share the last).
const DOUBLINGS: u32 = 27;
const BUCKETS: usize = (SUB_BUCKETS * DOUBLINGS) as usize + 2;
/// The exposed histogram's bounds: every doubling from 2^4 µs (16 µs) to 2^24 µs (~17 s).
const EXPOSED_DOUBLINGS: std::ops::RangeInclusive<u32> = 4..=24;

/// Now, in microseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Totals of one direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkTotals {
    /// Encoded frame bytes (the protobuf message; gRPC, HTTP/2 and TLS framing not included).
    pub bytes: u64,
    /// Frames of any kind.
    pub frames: u64,
    /// Step frames.
    pub steps: u64,
    /// Hidden-state rows carried by those steps.
    pub rows: u64,
}

impl LinkTotals {
    /// What was added since `earlier`.
    pub fn since(&self, earlier: &LinkTotals) -> LinkTotals {
        LinkTotals {
            bytes: self.bytes.saturating_sub(earlier.bytes),
            frames: self.frames.saturating_sub(earlier.frames),
            steps: self.steps.saturating_sub(earlier.steps),
            rows: self.rows.saturating_sub(earlier.rows),
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    bytes: AtomicU64,
    frames: AtomicU64,
    steps: AtomicU64,
    rows: AtomicU64,
}

impl Counters {
    fn record(&self, frame: &v1::StageFrame) {
        use prost::Message;
        self.bytes
            .fetch_add(frame.encoded_len() as u64, Ordering::Relaxed);
        self.frames.fetch_add(1, Ordering::Relaxed);
        if let Some(WireFrame::Step(s)) = &frame.frame {
            let rows: u64 = s.seqs.iter().map(|q| u64::from(q.n_tokens)).sum();
            self.steps.fetch_add(1, Ordering::Relaxed);
            self.rows.fetch_add(rows, Ordering::Relaxed);
        }
    }

    fn totals(&self) -> LinkTotals {
        LinkTotals {
            bytes: self.bytes.load(Ordering::Relaxed),
            frames: self.frames.load(Ordering::Relaxed),
            steps: self.steps.load(Ordering::Relaxed),
            rows: self.rows.load(Ordering::Relaxed),
        }
    }
}

/// A snapshot of the hop-latency histogram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencySnapshot {
    /// Observations per bucket (bucket `i > 0` holds [2^((i-1)/8), 2^(i/8)) µs).
    counts: Vec<u64>,
    /// Sum of the observations, µs.
    sum_micros: u64,
}

impl LatencySnapshot {
    /// Observations.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// What was observed since `earlier`.
    pub fn since(&self, earlier: &LatencySnapshot) -> LatencySnapshot {
        LatencySnapshot {
            counts: self
                .counts
                .iter()
                .zip(earlier.counts.iter().chain(std::iter::repeat(&0)))
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
            sum_micros: self.sum_micros.saturating_sub(earlier.sum_micros),
        }
    }

    /// The mean, if anything was observed.
    pub fn mean(&self) -> Option<Duration> {
        let n = self.count();
        (n > 0).then(|| Duration::from_micros(self.sum_micros / n))
    }

    /// The `q` quantile (0 ≤ q ≤ 1), within the histogram's resolution (the geometric middle
    /// of the bucket it falls in); `None` when nothing was observed.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(bucket_middle(i));
            }
        }
        self.counts.len().checked_sub(1).map(bucket_middle)
    }
}

fn bucket_of(micros: u64) -> usize {
    if micros == 0 {
        return 0;
    }
    let i = ((micros as f64).log2() * f64::from(SUB_BUCKETS)).floor() as usize + 1;
    i.min(BUCKETS - 1)
}

fn bucket_upper_micros(i: usize) -> f64 {
    2f64.powf(i as f64 / f64::from(SUB_BUCKETS))
}

fn bucket_middle(i: usize) -> Duration {
    if i == 0 {
        return Duration::ZERO;
    }
    let mid = 2f64.powf((i as f64 - 0.5) / f64::from(SUB_BUCKETS));
    Duration::from_secs_f64(mid / 1e6)
}

#[derive(Debug)]
struct LatencyHistogram {
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            counts: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    fn observe(&self, micros: u64) {
        if let Some(c) = self.counts.get(bucket_of(micros)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            sum_micros: self.sum_micros.load(Ordering::Relaxed),
        }
    }
}

/// Which neighbour of a stage a frame is exchanged with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// The stage before this one (links this node accepted).
    Previous,
    /// The stage after this one (links this node opened).
    Next,
}

impl Peer {
    fn as_str(self) -> &'static str {
        match self {
            Peer::Previous => "previous",
            Peer::Next => "next",
        }
    }
}

/// What one node exchanged with one neighbour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerTotals {
    /// Frames this node sent to it.
    pub sent: LinkTotals,
    /// Frames this node received from it.
    pub received: LinkTotals,
}

impl PeerTotals {
    /// What was added since `earlier`.
    pub fn since(&self, earlier: &PeerTotals) -> PeerTotals {
        PeerTotals {
            sent: self.sent.since(&earlier.sent),
            received: self.received.since(&earlier.received),
        }
    }

    /// Bytes in both directions.
    pub fn bytes(&self) -> u64 {
        self.sent.bytes + self.received.bytes
    }
}

#[derive(Debug, Default)]
struct PeerCounters {
    sent: Counters,
    received: Counters,
}

/// The stage-link figures of one node, shared by all its links. Cheap to share by `Arc`.
#[derive(Debug, Default)]
pub struct LinkMetrics {
    previous: PeerCounters,
    next: PeerCounters,
    hop: LatencyHistogram,
}

impl LinkMetrics {
    fn peer(&self, peer: Peer) -> &PeerCounters {
        match peer {
            Peer::Previous => &self.previous,
            Peer::Next => &self.next,
        }
    }

    /// Counts a frame this node sends to `peer`.
    pub(crate) fn frame_sent(&self, peer: Peer, frame: &v1::StageFrame) {
        self.peer(peer).sent.record(frame);
    }

    /// Counts a frame this node received from `peer`, and records a step's hop latency.
    pub(crate) fn frame_received(&self, peer: Peer, frame: &v1::StageFrame) {
        self.peer(peer).received.record(frame);
        if let Some(WireFrame::Step(s)) = &frame.frame
            && s.sent_unix_micros != 0
        {
            self.hop
                .observe(unix_micros().saturating_sub(s.sent_unix_micros));
        }
    }

    /// What this node exchanged with `peer` so far, over all its links.
    pub fn with(&self, peer: Peer) -> PeerTotals {
        let c = self.peer(peer);
        PeerTotals {
            sent: c.sent.totals(),
            received: c.received.totals(),
        }
    }

    /// The latency of every stamped step this node received so far (from its previous
    /// stage: steps only go down the pipeline).
    pub fn hop_latency(&self) -> LatencySnapshot {
        self.hop.snapshot()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LinkLabels {
    peer: &'static str,
    direction: &'static str,
}

/// Exposes a node's [`LinkMetrics`] at scrape time.
#[derive(Debug)]
pub(crate) struct LinkCollector(pub Arc<LinkMetrics>);

/// A counter family: its name, its help text and which total it reads.
type CounterFamily = (&'static str, &'static str, fn(&LinkTotals) -> u64);

fn counter_base(name: &'static str) -> &'static str {
    name.strip_suffix("_total").unwrap_or(name)
}

impl Collector for LinkCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let peers = [Peer::Previous, Peer::Next].map(|p| (p, self.0.with(p)));
        let counters: [CounterFamily; 4] = [
            (
                NODE_STAGE_LINK_BYTES_TOTAL,
                "Encoded bytes of pipeline stage-link frames",
                |t| t.bytes,
            ),
            (
                NODE_STAGE_LINK_FRAMES_TOTAL,
                "Pipeline stage-link frames",
                |t| t.frames,
            ),
            (
                NODE_STAGE_LINK_STEPS_TOTAL,
                "Pipeline steps over stage links",
                |t| t.steps,
            ),
            (
                NODE_STAGE_LINK_ROWS_TOTAL,
                "Hidden-state rows (token positions) over stage links",
                |t| t.rows,
            ),
        ];
        for (name, help, get) in counters {
            let mut family =
                encoder.encode_descriptor(counter_base(name), help, None, MetricType::Counter)?;
            for (peer, totals) in &peers {
                for (direction, t) in [("sent", &totals.sent), ("received", &totals.received)] {
                    let labels = LinkLabels {
                        peer: peer.as_str(),
                        direction,
                    };
                    ConstCounter::new(get(t)).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let hop = self.0.hop_latency();
        let mut buckets = Vec::new();
        let mut below = 0u64;
        let mut i = 0usize;
        for d in EXPOSED_DOUBLINGS {
            let edge = (d * SUB_BUCKETS) as usize;
            let mut n = 0;
            while i <= edge && i < hop.counts.len() {
                n += hop.counts[i];
                i += 1;
            }
            below += n;
            buckets.push((bucket_upper_micros(edge) / 1e6, n));
        }
        let count = hop.count();
        buckets.push((f64::INFINITY, count - below));
        let mut metric = encoder.encode_descriptor(
            NODE_STAGE_HOP_LATENCY_SECONDS,
            "Latency of received pipeline steps: this node's clock minus the sender's stamp \
             (includes clock skew between machines)",
            None,
            MetricType::Histogram,
        )?;
        metric.encode_histogram::<NoLabelSet>(
            hop.sum_micros as f64 / 1e6,
            count,
            &buckets,
            None,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn step(rows: u32, sent: u64) -> v1::StageFrame {
        v1::StageFrame {
            frame: Some(WireFrame::Step(v1::StageStep {
                step: 1,
                seqs: vec![v1::StageSeqSlice {
                    seq: 1,
                    pos: 0,
                    n_tokens: rows,
                    sample: true,
                    tokens: Vec::new(),
                }],
                hidden: None,
                sent_unix_micros: sent,
            })),
        }
    }

    #[test]
    fn quantiles_land_within_the_bucket_resolution() {
        let h = LatencyHistogram::default();
        for us in 1..=1000u64 {
            h.observe(us * 100);
        }
        let s = h.snapshot();
        assert_eq!(s.count(), 1000);
        let p50 = s.quantile(0.5).unwrap().as_secs_f64() * 1e6;
        let p99 = s.quantile(0.99).unwrap().as_secs_f64() * 1e6;
        assert!((p50 / 50_000.0 - 1.0).abs() < 0.05, "{p50}");
        assert!((p99 / 99_000.0 - 1.0).abs() < 0.05, "{p99}");
        assert_eq!(s.mean(), Some(Duration::from_micros(50_050)));
        assert_eq!(s.since(&s).count(), 0);
        assert_eq!(LatencyHistogram::default().snapshot().quantile(0.5), None);
    }

    #[test]
    fn frames_are_counted_by_direction_and_steps_stamp_the_hop() {
        let m = LinkMetrics::default();
        m.frame_sent(Peer::Next, &step(3, 0));
        m.frame_received(
            Peer::Previous,
            &step(2, unix_micros().saturating_sub(2_000)),
        );
        m.frame_received(Peer::Previous, &step(1, 0)); // unstamped: counted, not timed
        m.frame_received(
            Peer::Previous,
            &v1::StageFrame {
                frame: Some(WireFrame::Release(v1::StageRelease { seqs: vec![1] })),
            },
        );
        let next = m.with(Peer::Next);
        assert_eq!((next.sent.steps, next.sent.rows), (1, 3));
        assert_eq!(next.received, LinkTotals::default());
        let r = m.with(Peer::Previous).received;
        assert_eq!((r.frames, r.steps, r.rows), (3, 2, 3));
        assert!(r.bytes > 0);
        assert_eq!(m.with(Peer::Previous).bytes(), r.bytes);
        let hop = m.hop_latency();
        assert_eq!(hop.count(), 1);
        assert!(hop.quantile(0.5).unwrap() >= Duration::from_micros(1_800));

        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(LinkCollector(Arc::new(m))));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                "shoal_node_stage_link_steps_total{peer=\"previous\",direction=\"received\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("shoal_node_stage_hop_latency_seconds_count 1"),
            "{text}"
        );
        for name in LINK_NAMES {
            assert!(text.contains(name), "{name} missing from {text}");
        }
    }
}
