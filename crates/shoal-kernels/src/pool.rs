//! A persistent pool of compute threads for the ~250 short parallel regions of a decode step.
//!
//! Starting threads per region would cost more than the regions themselves, and blocking on a
//! condition variable after every region adds wake-up latency of tens of microseconds. So workers
//! spin on an epoch counter for a short while after each region (the next region usually follows
//! within microseconds) and only then park on a condition variable, so an idle pool costs no CPU.
//!
//! Thread indices are claimed, not assigned: each worker that wakes claims the next unclaimed
//! index, and the calling thread, once done with index 0, claims whatever is left. So a worker
//! that is descheduled (a busy machine) or still waking from a park never holds the caller up:
//! its share simply runs on the caller. Each index still runs exactly once per `run`.
//!
//! The closure of a [`ThreadPool::run`] borrows from the caller's stack. Workers reach it through
//! a raw pointer published with the epoch, and only after claiming an index; `run` does not
//! return (or unwind) before every claimed index has finished. That is the one `unsafe` idea in
//! this module.
#![allow(unsafe_code)]

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::KernelError;

/// How long an idle worker spins before parking.
const DEFAULT_SPIN: Duration = Duration::from_micros(200);

/// A `next` value that no claim can succeed from. Failed claims keep incrementing `next`, so it
/// sits far from `usize::MAX` where an increment would wrap to a valid index.
const CLOSED: usize = usize::MAX / 2;

/// The job type workers see: a borrowed closure taking (thread index, thread count).
type Job<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// Keeps a hot atomic on its own cache line so the caller's writes and the workers' writes do
/// not invalidate each other's lines.
#[repr(align(128))]
struct Padded<T>(T);

struct Shared {
    /// Bumped once per job (and once for shutdown) to wake workers.
    epoch: Padded<AtomicUsize>,
    /// The next thread index to claim for the current job (values `>= n_threads`: none left).
    next: Padded<AtomicUsize>,
    /// Indices claimed by workers that have finished running.
    done: Padded<AtomicUsize>,
    /// Points at a `Job` on the stack of the thread in `run`; valid for any index claimed from
    /// `next` until that index is counted in `done`.
    job: AtomicPtr<()>,
    shutdown: AtomicBool,
    panicked: AtomicBool,
    /// Workers parked (or about to park) on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    n_threads: usize,
    spin: Duration,
}

/// A persistent pool of compute threads. `n_threads` counts the calling thread.
///
/// Workers spin briefly waiting for work and then park, so an idle pool costs no CPU. Dropping
/// the pool stops and joins the workers.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Held for the duration of a parallel `run`; a second, concurrent or nested, `run` finds it
    /// taken and executes its closure serially instead of deadlocking.
    busy: Mutex<()>,
}

impl fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThreadPool")
            .field("n_threads", &self.shared.n_threads)
            .finish_non_exhaustive()
    }
}

impl ThreadPool {
    /// Starts `n_threads - 1` workers (the calling thread is the remaining one).
    pub fn new(n_threads: usize) -> Result<Self, KernelError> {
        Self::with_spin(n_threads, DEFAULT_SPIN)
    }

    /// As [`ThreadPool::new`], with how long idle workers spin before parking.
    pub fn with_spin(n_threads: usize, spin: Duration) -> Result<Self, KernelError> {
        if n_threads == 0 {
            return Err(KernelError::NoThreads);
        }
        let shared = Arc::new(Shared {
            epoch: Padded(AtomicUsize::new(0)),
            next: Padded(AtomicUsize::new(CLOSED)),
            done: Padded(AtomicUsize::new(0)),
            job: AtomicPtr::new(std::ptr::null_mut()),
            shutdown: AtomicBool::new(false),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            n_threads,
            spin,
        });
        let mut pool = ThreadPool {
            shared,
            workers: Vec::with_capacity(n_threads - 1),
            busy: Mutex::new(()),
        };
        for index in 1..n_threads {
            let shared = Arc::clone(&pool.shared);
            let handle = std::thread::Builder::new()
                .name(format!("shoal-compute-{index}"))
                .spawn(move || worker_loop(&shared))
                .map_err(|source| KernelError::ThreadSpawn { index, source })?;
            // On an early return, Drop stops the workers started so far.
            pool.workers.push(handle);
        }
        Ok(pool)
    }

    /// Number of threads, the caller included.
    pub fn n_threads(&self) -> usize {
        self.shared.n_threads
    }

    /// Runs `f(thread_index, n_threads)` for every index in `0..n_threads` and returns when all
    /// calls have returned. The caller runs index 0; each other index runs on a worker, or on the
    /// caller if no worker has claimed it by the time the caller is done with its own. A panic in
    /// any call is re-raised here after all calls finished.
    ///
    /// If the pool is already running a job (a nested call from inside `f`, or a call from
    /// another thread), the calls run one after another on this thread instead.
    pub fn run<F: Fn(usize, usize) + Sync>(&self, f: F) {
        let n = self.shared.n_threads;
        if n == 1 {
            f(0, 1);
            return;
        }
        let _guard: MutexGuard<'_, ()> = match self.busy.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                (0..n).for_each(|i| f(i, n));
                return;
            }
        };
        let job: Job<'_> = &f;
        let shared = &*self.shared;
        shared
            .job
            .store((&raw const job).cast::<()>().cast_mut(), Ordering::Relaxed);
        shared.done.0.store(0, Ordering::Relaxed);
        // Opens the claims; releases the job pointer and the reset `done` to claimers.
        shared.next.0.store(1, Ordering::Release);
        // SeqCst pairs with the sleepers check in `wait_for_epoch` (no lost wake-ups).
        shared.epoch.0.fetch_add(1, Ordering::SeqCst);
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _lock = lock(&shared.lock);
            shared.wake.notify_all();
        }
        let mut stolen = 0;
        let mine = catch_unwind(AssertUnwindSafe(|| {
            f(0, n);
            loop {
                let i = shared.next.0.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                stolen += 1;
                f(i, n);
            }
        }));
        if mine.is_err() {
            // Close the claims so no worker starts after the unwind begins; what was still
            // unclaimed will never run, so count it as ours.
            stolen += n.saturating_sub(shared.next.0.swap(CLOSED, Ordering::Relaxed));
        }
        // Workers may still be running claimed indices: wait for them before returning or
        // unwinding. Every index but 0 was claimed either by us (`stolen`) or by a worker.
        let claimed_by_workers = n - 1 - stolen.min(n - 1);
        let mut spins = 0u32;
        while shared.done.0.load(Ordering::Acquire) < claimed_by_workers {
            spins = spins.saturating_add(1);
            if spins < 1 << 16 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        shared.job.store(std::ptr::null_mut(), Ordering::Relaxed);
        if let Err(payload) = mine {
            resume_unwind(payload);
        }
        if shared.panicked.swap(false, Ordering::Relaxed) {
            panic!("a compute thread panicked inside ThreadPool::run");
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        let shared = &*self.shared;
        shared.shutdown.store(true, Ordering::Relaxed);
        shared.epoch.0.fetch_add(1, Ordering::SeqCst);
        {
            let _lock = lock(&shared.lock);
            shared.wake.notify_all();
        }
        for handle in self.workers.drain(..) {
            // A worker cannot panic outside a job (jobs are caught), so a join error carries
            // nothing to act on.
            let _ = handle.join();
        }
    }
}

/// Locks a mutex that guards no data, ignoring poisoning (there is no state to be corrupt).
fn lock(m: &Mutex<()>) -> MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn worker_loop(shared: &Shared) {
    let n = shared.n_threads;
    let mut seen = 0usize;
    loop {
        seen = wait_for_epoch(shared, seen);
        if shared.shutdown.load(Ordering::Relaxed) {
            return;
        }
        // Claim indices until none are left. A claim can only succeed while a `run` is in
        // flight: `next` is past the end from the moment the caller takes the last index until
        // the next `run` opens it again (after publishing its job).
        loop {
            let i = shared.next.0.fetch_add(1, Ordering::Acquire);
            if i >= n {
                break;
            }
            let ptr = shared
                .job
                .load(Ordering::Relaxed)
                .cast_const()
                .cast::<Job<'_>>();
            // SAFETY: our successful claim acquired the `next` store that opened this job, which
            // was made after `job` pointed at a `Job` on the stack of the thread in `run`. That
            // thread does not return or unwind until `done` counts our index, which happens
            // after our last use of the job below.
            let job: Job<'_> = unsafe { *ptr };
            if catch_unwind(AssertUnwindSafe(|| job(i, n))).is_err() {
                shared.panicked.store(true, Ordering::Relaxed);
            }
            shared.done.0.fetch_add(1, Ordering::Release);
        }
    }
}

/// Waits until the epoch differs from `seen`, spinning for `shared.spin` and then parking.
fn wait_for_epoch(shared: &Shared, seen: usize) -> usize {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let e = shared.epoch.0.load(Ordering::Acquire);
        if e != seen {
            return e;
        }
        spins = spins.wrapping_add(1);
        if spins.is_multiple_of(256) && start.elapsed() >= shared.spin {
            break;
        }
        std::hint::spin_loop();
    }
    let mut guard = lock(&shared.lock);
    shared.sleepers.fetch_add(1, Ordering::SeqCst);
    loop {
        let e = shared.epoch.0.load(Ordering::SeqCst);
        if e != seen {
            shared.sleepers.fetch_sub(1, Ordering::SeqCst);
            return e;
        }
        guard = shared.wake.wait(guard).unwrap_or_else(|p| p.into_inner());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_index_runs_once_per_call() {
        for n in 1..=4 {
            let pool = ThreadPool::new(n).unwrap();
            assert_eq!(pool.n_threads(), n);
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            for _ in 0..1000 {
                pool.run(|i, nt| {
                    assert_eq!(nt, n);
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
            }
            for h in &hits {
                assert_eq!(h.load(Ordering::Relaxed), 1000);
            }
        }
    }

    #[test]
    fn workers_wake_after_parking() {
        let pool = ThreadPool::with_spin(3, Duration::from_micros(1)).unwrap();
        let total = AtomicU64::new(0);
        for round in 0..20u64 {
            // Long enough for every worker to give up spinning and park.
            std::thread::sleep(Duration::from_millis(2));
            pool.run(|i, _| {
                total.fetch_add(round * 10 + i as u64, Ordering::Relaxed);
            });
        }
        let expected: u64 = (0..20u64).map(|r| 3 * r * 10 + 3).sum();
        assert_eq!(total.load(Ordering::Relaxed), expected);
    }

    #[test]
    fn borrows_from_the_caller_and_writes_disjoint_parts() {
        let pool = ThreadPool::new(2).unwrap();
        let data: Vec<u64> = (0..1000).collect();
        let sums: Vec<AtomicU64> = (0..2).map(|_| AtomicU64::new(0)).collect();
        pool.run(|i, n| {
            let chunk = data.len().div_ceil(n);
            let part: u64 = data.iter().skip(i * chunk).take(chunk).sum();
            sums[i].store(part, Ordering::Relaxed);
        });
        let total: u64 = sums.iter().map(|s| s.load(Ordering::Relaxed)).sum();
        assert_eq!(total, 999 * 1000 / 2);
    }

    #[test]
    fn nested_run_executes_serially_instead_of_deadlocking() {
        let pool = ThreadPool::new(2).unwrap();
        let count = AtomicUsize::new(0);
        pool.run(|_, _| {
            pool.run(|_, _| {
                count.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(count.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn worker_panic_is_reraised_and_pool_stays_usable() {
        let pool = ThreadPool::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(|i, _| {
                if i == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(|_, _| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn stress_each_index_runs_exactly_once_while_workers_park_and_wake() {
        // A tiny spin makes workers park between most runs, exercising wake-ups and late
        // claims; uneven work makes the caller steal some indices and not others.
        let pool = ThreadPool::with_spin(4, Duration::from_micros(2)).unwrap();
        let seen = AtomicUsize::new(0);
        for round in 0..5000 {
            pool.run(|i, n| {
                assert_eq!(n, 4);
                let before = seen.fetch_or(1 << i, Ordering::Relaxed);
                assert_eq!(before & (1 << i), 0, "index {i} ran twice in round {round}");
                if (round + i) % 7 == 0 {
                    std::hint::black_box((0..200).sum::<u64>());
                }
            });
            // Every index ran, and all of them finished before `run` returned.
            assert_eq!(seen.swap(0, Ordering::Relaxed), 0b1111, "round {round}");
            if round % 500 == 0 {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    #[test]
    fn zero_threads_is_an_error() {
        assert!(matches!(ThreadPool::new(0), Err(KernelError::NoThreads)));
    }
}
