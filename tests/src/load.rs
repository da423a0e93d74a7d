//! A small load generator for end-to-end rates through namespaces: a server
//! with a fixed pool of workers, and clients that either open a connection
//! per request or keep one open. Every loop is bounded in count and time and
//! stops by itself.
//!
//! The protocol is as small as it gets so that the network path, not the
//! application, is what is measured: the client sends one line (`REQUEST`),
//! the server answers with `RESPONSE_LEN` bytes per line it reads.
use std::{
    fs::File,
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use nix::{
    sched::{CloneFlags, CpuSet, sched_setaffinity, setns},
    unistd::Pid,
};

use crate::netns::Netns;

pub const REQUEST: &[u8] = b"GET /\n";
pub const RESPONSE_LEN: usize = 64;

/// The CPUs that clients and servers are pinned to, when there are at least
/// two: clients on the first, servers on the last. Left to the scheduler, a
/// request/response pair lands sometimes on one CPU and sometimes on two,
/// and rates jump between two modes from one run to the next; pinned, every
/// path is measured in the same placement (packets are forwarded in the
/// softirq of the CPU that sent them, so each side also carries its own
/// direction's forwarding).
pub fn cpus() -> Option<(usize, usize)> {
    let n = thread::available_parallelism().map(|n| n.get()).ok()?;
    (n >= 2).then_some((0, n - 1))
}

/// Pins the calling thread to `cpu`; failure only costs stability.
fn pin(cpu: Option<usize>) {
    if let Some(cpu) = cpu {
        let mut set = CpuSet::new();
        if set.set(cpu).is_ok() {
            let _ = sched_setaffinity(Pid::from_raw(0), &set);
        }
    }
}

/// A TCP server answering `RESPONSE_LEN` bytes per request line, on a pool
/// of worker threads that each accept and serve one connection at a time.
/// Stops (and joins its threads) on drop.
pub struct LoadServer {
    stop: Arc<AtomicBool>,
    listener: TcpListener,
    workers: Vec<thread::JoinHandle<()>>,
}

impl LoadServer {
    /// `workers` bounds the number of connections served at once: give it at
    /// least the number of kept-alive client connections.
    pub fn start(ns: &Netns, addr: Ipv4Addr, port: u16, workers: usize) -> anyhow::Result<Self> {
        let bind = SocketAddrV4::new(addr, port);
        let listener = ns.within(move || TcpListener::bind(bind))??;
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = vec![];
        for _ in 0..workers {
            let l = listener.try_clone()?;
            let stop = stop.clone();
            let cpu = cpus().map(|c| c.1);
            handles.push(thread::spawn(move || {
                pin(cpu);
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, _)) => serve(s, &stop),
                        // shutdown() of the listener on drop wakes accept with
                        // an error; anything else is retried after a pause.
                        Err(_) if stop.load(Ordering::Relaxed) => return,
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
        }
        Ok(Self {
            stop,
            listener,
            workers: handles,
        })
    }
}

fn serve(mut s: TcpStream, stop: &AtomicBool) {
    let _ = s.set_nodelay(true);
    // A timeout so that a worker holding an idle connection still sees `stop`.
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let response = [b'x'; RESPONSE_LEN];
    let mut buf = [0u8; 512];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                // One answer per request line, however the bytes were split.
                for _ in buf[..n].iter().filter(|b| **b == b'\n') {
                    if s.write_all(&response).is_err() {
                        return;
                    }
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
            }
            Err(_) => return,
        }
    }
}

impl Drop for LoadServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes every worker blocked in accept().
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Connect, one request and its response, close.
    ShortConnections,
    /// One request after the other on a connection opened beforehand.
    KeptAlive,
}

/// What one load run measured.
#[derive(Clone, Debug, Default)]
pub struct LoadResult {
    /// Completed requests (each on its own connection for ShortConnections).
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    /// Per-request latency in microseconds, sorted.
    pub latencies_us: Vec<f64>,
}

impl LoadResult {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// One request started at `started`: its latency when it succeeded.
    fn record(&mut self, started: Instant, res: std::io::Result<()>) {
        match res {
            Ok(()) => {
                self.ok += 1;
                self.latencies_us
                    .push(started.elapsed().as_secs_f64() * 1e6);
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }

    pub fn percentile_us(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() - 1) as f64 * p).round() as usize;
        self.latencies_us[i]
    }
}

fn one_request(s: &mut TcpStream) -> std::io::Result<()> {
    s.write_all(REQUEST)?;
    let mut got = 0;
    let mut buf = [0u8; RESPONSE_LEN];
    while got < RESPONSE_LEN {
        match s.read(&mut buf[got..])? {
            0 => return Err(ErrorKind::UnexpectedEof.into()),
            n => got += n,
        }
    }
    Ok(())
}

const IO_TIMEOUT: Duration = Duration::from_secs(2);

fn short_connection(to: SocketAddrV4) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&SocketAddr::V4(to), IO_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    // The client closes first (on drop), as an HTTP/1.0 client would: its
    // side keeps TIME_WAIT, see `prepare_client`.
    one_request(&mut s)
}

/// Widens the client namespace's ephemeral port range and lets it reuse
/// TIME_WAIT ports: a few seconds of short connections would otherwise run
/// out of ports and measure that instead of the path.
pub fn prepare_client(ns: &Netns) -> anyhow::Result<()> {
    ns.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
    ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    Ok(())
}

/// Load settings: `threads` client threads (each with one connection when
/// kept alive), measured for `limit` or `max_ops` requests in all, whichever
/// comes first, after `warmup`.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub mode: Mode,
    pub threads: usize,
    pub warmup: Duration,
    pub limit: Duration,
    pub max_ops: u64,
}

/// Runs `load` from the network namespace at `client_ns` (a /run/netns
/// path) against `targets`, each thread cycling through them.
pub fn run(client_ns: &str, targets: &[SocketAddrV4], load: Load) -> anyhow::Result<LoadResult> {
    anyhow::ensure!(!targets.is_empty(), "no target");
    let per_thread = load.max_ops.div_ceil(load.threads as u64);
    let mut handles = vec![];
    for t in 0..load.threads {
        let file = File::open(client_ns).with_context(|| client_ns.to_string())?;
        let targets = targets.to_vec();
        handles.push(thread::spawn(move || -> anyhow::Result<LoadResult> {
            setns(&file, CloneFlags::CLONE_NEWNET).context("setns into the client namespace")?;
            pin(cpus().map(|c| c.0));
            client_thread(&targets, t, load, per_thread)
        }));
    }
    let mut total = LoadResult::default();
    for h in handles {
        let r = h
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        total.ok += r.ok;
        total.errors += r.errors;
        total.first_error = total.first_error.or(r.first_error);
        // Threads start and stop together; the longest one is the window.
        total.elapsed = total.elapsed.max(r.elapsed);
        total.latencies_us.extend(r.latencies_us);
    }
    total.latencies_us.sort_by(|a, b| a.total_cmp(b));
    Ok(total)
}

/// One request in `mode`: on a connection of its own, or on `conn`, which
/// is opened to `to` when there is none.
fn op(mode: Mode, conn: &mut Option<TcpStream>, to: SocketAddrV4) -> std::io::Result<()> {
    match mode {
        Mode::ShortConnections => short_connection(to),
        Mode::KeptAlive => {
            let s = match conn {
                Some(s) => s,
                None => {
                    let s = TcpStream::connect_timeout(&SocketAddr::V4(to), IO_TIMEOUT)?;
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(IO_TIMEOUT))?;
                    conn.insert(s)
                }
            };
            let res = one_request(s);
            if res.is_err() {
                // Reconnect on the next request rather than give up.
                *conn = None;
            }
            res
        }
    }
}

fn client_thread(
    targets: &[SocketAddrV4],
    offset: usize,
    load: Load,
    max_ops: u64,
) -> anyhow::Result<LoadResult> {
    let mut r = LoadResult::default();
    let mut k = offset;
    let mut next_target = || {
        k += 1;
        targets[k % targets.len()]
    };
    let mut conn = None;
    let op = |conn: &mut Option<TcpStream>, to| op(load.mode, conn, to);
    // Warm-up: neighbour entries, conntrack, caches; not counted.
    let warm_end = Instant::now() + load.warmup;
    let mut warm_ops = 0u64;
    while Instant::now() < warm_end && warm_ops < max_ops {
        let _ = op(&mut conn, next_target());
        warm_ops += 1;
    }
    let start = Instant::now();
    let end = start + load.limit;
    r.latencies_us.reserve(max_ops.min(1 << 16) as usize);
    while r.ok + r.errors < max_ops {
        let t = Instant::now();
        if t >= end {
            break;
        }
        r.record(t, op(&mut conn, next_target()));
    }
    r.elapsed = start.elapsed();
    Ok(r)
}

/// One path of an interleaved run: a client namespace (a /run/netns path)
/// and the addresses its requests go to.
#[derive(Clone, Copy, Debug)]
pub struct Lane<'a> {
    pub client_ns: &'a str,
    pub targets: &'a [SocketAddrV4],
}

/// Which lane a moment belongs to: time is cut into slices of `slice`
/// from `epoch`, each cycle of `lanes` slices visits every lane once, in an
/// order shuffled per cycle, so that no lane always follows the same other
/// one (a connection's deferred work, such as its TIME_WAIT and close,
/// falls on whatever runs next). Every client thread reads the same
/// schedule, so they switch lanes together.
#[derive(Clone, Copy)]
struct Schedule {
    epoch: Instant,
    slice: Duration,
    lanes: usize,
}

impl Schedule {
    fn cycle_and_position(&self, at: Instant) -> (u64, usize) {
        let s =
            (at.saturating_duration_since(self.epoch).as_nanos() / self.slice.as_nanos()) as u64;
        (s / self.lanes as u64, (s % self.lanes as u64) as usize)
    }

    /// The lanes in the order cycle `cycle` visits them (Fisher-Yates with
    /// the cycle as seed).
    fn order(&self, cycle: u64) -> Vec<usize> {
        let mut rng = crate::rng::Rng::fixed(cycle.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0x5EED);
        let mut v: Vec<usize> = (0..self.lanes).collect();
        for i in (1..v.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
        v
    }
}

/// Runs `load` on every lane in one window, switching lanes every `slice`
/// (each lane gets `load.limit` of measured time and at most
/// `load.max_ops` requests, after `load.warmup` or one cycle, whichever is
/// longer). Measured one after the other, two paths see different moments
/// of a shared machine, and on these machines the rate of the same path
/// moves by 10 % from one second to the next; interleaved in slices much
/// shorter than those swings, every lane sees the same machine and their
/// ratio keeps only what differs between the paths. A lane's time is the
/// time from the start of each of its requests to the start of the next
/// request (of any lane), so a lane switch costs the lane it leaves.
///
/// Each request (each kept-alive connection, when it opens) goes to one of
/// its lane's targets at random, as a Service's backend choice does: a lane
/// of pod addresses then loads its pods as a lane through the Service loads
/// the same pods (cycling, two threads would always be on different pods).
pub fn run_interleaved(
    lanes: &[Lane],
    load: Load,
    slice: Duration,
) -> anyhow::Result<Vec<LoadResult>> {
    anyhow::ensure!(!lanes.is_empty(), "no lane");
    anyhow::ensure!(!slice.is_zero(), "a zero slice");
    for l in lanes {
        anyhow::ensure!(!l.targets.is_empty(), "no target in {}", l.client_ns);
    }
    let n = lanes.len();
    let warmup = load.warmup.max(slice * n as u32);
    // The clock starts once every thread is up, so none loses its first slices.
    let epoch = Instant::now() + Duration::from_millis(20);
    let schedule = Schedule {
        epoch,
        slice,
        lanes: n,
    };
    let measure_from = epoch + warmup;
    let end = measure_from + load.limit * n as u32;
    let per_thread = (load.max_ops * n as u64).div_ceil(load.threads as u64);
    let mut handles = vec![];
    for t in 0..load.threads {
        let files = lanes
            .iter()
            .map(|l| File::open(l.client_ns).with_context(|| l.client_ns.to_string()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let targets: Vec<Vec<SocketAddrV4>> = lanes.iter().map(|l| l.targets.to_vec()).collect();
        handles.push(thread::spawn(move || -> anyhow::Result<Vec<LoadResult>> {
            pin(cpus().map(|c| c.0));
            interleaved_thread(
                &files,
                &targets,
                t,
                load.mode,
                schedule,
                measure_from,
                end,
                per_thread,
            )
        }));
    }
    let mut totals = vec![LoadResult::default(); n];
    for h in handles {
        let rs = h
            .join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        for (total, r) in totals.iter_mut().zip(rs) {
            total.ok += r.ok;
            total.errors += r.errors;
            total.first_error = total.first_error.take().or(r.first_error);
            // The threads run side by side: the rate is all of them over
            // one thread's time (their mean).
            total.elapsed += r.elapsed / load.threads as u32;
            total.latencies_us.extend(r.latencies_us);
        }
    }
    for total in &mut totals {
        total.latencies_us.sort_by(|a, b| a.total_cmp(b));
    }
    Ok(totals)
}

#[allow(clippy::too_many_arguments)]
fn interleaved_thread(
    files: &[File],
    targets: &[Vec<SocketAddrV4>],
    thread: usize,
    mode: Mode,
    schedule: Schedule,
    measure_from: Instant,
    end: Instant,
    max_ops: u64,
) -> anyhow::Result<Vec<LoadResult>> {
    let n = files.len();
    let mut results = vec![LoadResult::default(); n];
    // Seeded per thread: the threads draw different sequences, every run the same.
    let mut rng =
        crate::rng::Rng::fixed(0x1a4e_5eed ^ (thread as u64 + 1).wrapping_mul(0x9E37_79B9));
    let mut conns: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut inside: Option<usize> = None;
    let mut order: (u64, Vec<usize>) = (u64::MAX, vec![]);
    // The previous request's lane and start, while measuring.
    let mut previous: Option<(usize, Instant)> = None;
    let mut ops = 0u64;
    std::thread::sleep(schedule.epoch.saturating_duration_since(Instant::now()));
    loop {
        let now = Instant::now();
        if let Some((lane, started)) = previous.take() {
            results[lane].elapsed += now - started;
        }
        if now >= end || ops >= max_ops {
            break;
        }
        let (cycle, position) = schedule.cycle_and_position(now);
        if order.0 != cycle {
            order = (cycle, schedule.order(cycle));
        }
        let lane = order.1[position];
        if inside != Some(lane) {
            setns(&files[lane], CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("setns into lane {lane}'s client namespace"))?;
            inside = Some(lane);
        }
        let to = *rng.pick(&targets[lane]);
        let res = op(mode, &mut conns[lane], to);
        if now < measure_from {
            continue;
        }
        ops += 1;
        results[lane].record(now, res);
        previous = Some((lane, now));
    }
    Ok(results)
}
