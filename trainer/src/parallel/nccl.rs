#![allow(unsafe_code)]
//! The NCCL reducer (feature `nccl`): one NCCL communicator per GPU of this process, made at once
//! with `ncclCommInitAll`; each worker thread all-reduces its buckets in place on its own
//! communicator, on a CUDA stream of its device owned by the reducer.
//!
//! # Libraries
//!
//! [`cudarc`] `dlopen`s libcuda and libnccl at the first call, so the crate builds without CUDA,
//! NCCL or their headers, and a binary built with the feature still starts on a machine without
//! them ([`NcclReducer::new`] then fails with an error instead). cudarc looks for the driver as
//! `libcuda.so`, `libcuda.so.13` or `libcuda.so.1` (any driver install has the last). For NCCL it
//! tries `libnccl.so`, `libnccl64*.so` and `libnccl.so.{13,11,10,1}`, but **not `libnccl.so.2`**,
//! the only name the torch wheel's `nvidia-nccl-cu13` ships (`site-packages/nvidia/nccl/lib`).
//! libtorch_cuda has already loaded that file into the process, but `dlopen("libnccl.so")` does
//! not match a library loaded as `libnccl.so.2`, so a `libnccl.so` must be findable where
//! `dlopen` from the binary looks: a `LD_LIBRARY_PATH` folder, the binary's RUNPATH (the torch
//! `lib` folder, see `build/torch_link.rs`) or the system folders. A symlink
//! `libnccl.so -> libnccl.so.2` in such a folder, or the system's `libnccl-dev` package, works;
//! [`NcclReducer::new`] says so when it is missing. cudarc 0.19.0 resolves every symbol of its
//! bindings when it loads a library, so libnccl must be 2.28 or later (the wheel has 2.28.9) and
//! the driver must support CUDA 13.0 (as torch cu130 needs anyway).
//!
//! # Stream ordering
//!
//! torch queues the gradient kernels on its current stream of the device, which tch does not
//! expose, so NCCL cannot be ordered after them with an event. Each call therefore waits for the
//! whole device (`tch::Cuda::synchronize`) before `ncclAllReduce`, runs it on the reducer's stream,
//! and waits for that stream before returning, so torch's later kernels read the sum. Both waits
//! are correct whatever streams torch uses; their cost (the GPU idles between the backward pass
//! and the exchange, no overlap of buckets with compute) is part of the measured comm fraction.
//!
//! # Failures and hangs
//!
//! NCCL kernels wait on the GPU for every peer, forever if one never calls. The reducer polls its
//! stream (`cuStreamQuery`) instead of blocking, and after `timeout` aborts every communicator
//! (`ncclCommAbort`, which makes the waiting kernels of the others exit) and fails the call,
//! naming the workers that never reached the all-reduce; [`BucketReducer::abort`] (a worker
//! failed or panicked) does the same with its reason. After either, every call fails with the
//! stored reason. A communicator is never aborted while its own thread is inside an NCCL call on
//! it: that thread aborts it when the call returns.
//!
//! NCCL (2.22 and later) connects peers lazily, on the first collective that needs a given
//! algorithm, and that first `ncclAllReduce` can block on the host until the peers call too; a
//! worker blocked there cannot time out itself (the others do, and abort their communicators).
//! [`NcclReducer::new`] runs one grouped warm-up all-reduce from one thread to make the common
//! connections up front; `NCCL_RUNTIME_CONNECT=0` in the environment makes NCCL connect every
//! algorithm in `ncclCommInitAll` instead.

use super::BucketReducer;
use crate::error::{Error, Result};
use cudarc::driver::result as cu_result;
use cudarc::driver::{CudaContext, CudaStream, DevicePtrMut, DriverError, sys as cu};
use cudarc::nccl::result::{self as nccl, NcclError};
use cudarc::nccl::sys as nccl_sys;
use std::ffi::{CStr, c_int, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Elements (f32) of the warm-up all-reduce in [`NcclReducer::new`]: 32 MiB, the size class of
/// real gradient buckets (25 MiB by default), so NCCL connects the algorithm those will use.
const WARMUP_ELEMENTS: usize = 8 << 20;

/// Polls of a running all-reduce that only yield the thread before sleeping between polls.
const SPIN_POLLS: u32 = 64;

/// The longest sleep between two polls of a running all-reduce.
const MAX_POLL_PAUSE: Duration = Duration::from_micros(500);

/// Sums buckets among the worker threads of this process, one per GPU, with NCCL.
#[derive(Debug)]
pub struct NcclReducer {
    /// CUDA ordinal of each rank's device.
    devices: Vec<usize>,
    timeout: Duration,
    /// Each rank's stream (non-blocking, on its device's primary context, the one torch uses).
    streams: Vec<Arc<CudaStream>>,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Each rank's communicator; null once aborted.
    comms: Vec<Comm>,
    /// Ranks inside an NCCL call on their communicator: an abort leaves those to their thread.
    busy: Vec<bool>,
    /// All-reduces each rank has started, to name the ranks that did not reach one.
    calls: Vec<u64>,
    failed: Option<String>,
}

#[derive(Debug)]
struct Comm(nccl_sys::ncclComm_t);

// SAFETY: an NCCL communicator may be used from any thread as long as calls on it do not overlap.
// `Comm`s live in `State` behind a mutex; a rank's communicator is used outside the lock only by
// that rank's thread while `busy` is set, and aborted only under the lock while it is not.
unsafe impl Send for Comm {}

impl NcclReducer {
    /// One worker per entry of `devices` (CUDA ordinals, rank i on `devices[i]`, each at most
    /// once). An all-reduce that has not completed `timeout` after a worker started it (a peer
    /// crashed or hangs) fails on every worker. Fails when libcuda or libnccl cannot be loaded
    /// or NCCL cannot connect the devices.
    pub fn new(devices: &[usize], timeout: Duration) -> Result<NcclReducer> {
        if devices.is_empty() {
            return Err(parallel(
                "the NCCL reducer needs at least one CUDA device".into(),
            ));
        }
        for (i, d) in devices.iter().enumerate() {
            if devices[..i].contains(d) {
                return Err(parallel(format!(
                    "cuda:{d} is listed twice; NCCL takes one data-parallel worker per device"
                )));
            }
        }
        check_libraries()?;
        cu_result::init().map_err(|e| cuda_error("initialising the CUDA driver", e))?;
        // The thread's current context is restored on return: torch keeps using this thread.
        let _restore = CurrentContext::save()?;
        let mut streams = Vec::with_capacity(devices.len());
        for &d in devices {
            let ctx =
                CudaContext::new(d).map_err(|e| cuda_error(&format!("opening cuda:{d}"), e))?;
            let stream = ctx
                .new_stream()
                .map_err(|e| cuda_error(&format!("creating a stream on cuda:{d}"), e))?;
            streams.push(stream);
        }
        let ordinals = devices
            .iter()
            .map(|&d| c_int::try_from(d))
            .collect::<std::result::Result<Vec<c_int>, _>>()
            .map_err(|_| parallel(format!("CUDA ordinals {devices:?} out of range")))?;
        let n = c_int::try_from(devices.len())
            .map_err(|_| parallel(format!("{} devices are too many", devices.len())))?;
        let mut raw: Vec<nccl_sys::ncclComm_t> = vec![std::ptr::null_mut(); devices.len()];
        // SAFETY: `raw` has room for `n` communicators, which NCCL writes; `ordinals` holds `n`
        // distinct ordinals of devices that exist (their contexts were opened above).
        unsafe { nccl::comm_init_all(raw.as_mut_ptr(), n, ordinals.as_ptr()) }.map_err(|e| {
            nccl_error(
                &format!("creating NCCL communicators for cuda:{devices:?} (ncclCommInitAll)"),
                e,
            )
        })?;
        let workers = devices.len();
        let reducer = NcclReducer {
            devices: devices.to_vec(),
            timeout,
            streams,
            state: Mutex::new(State {
                comms: raw.into_iter().map(Comm).collect(),
                busy: vec![false; workers],
                calls: vec![0; workers],
                failed: None,
            }),
        };
        if workers > 1 {
            // On failure the reducer is dropped, which aborts the communicators.
            reducer.warm_up()?;
        }
        tracing::info!(devices = ?devices, "NCCL gradient reducer ready");
        Ok(reducer)
    }

    /// CUDA ordinal of each rank's device.
    pub fn devices(&self) -> &[usize] {
        &self.devices
    }

    /// One all-reduce of [`WARMUP_ELEMENTS`] zeros on every device, issued from this thread in
    /// one NCCL group: the connections real buckets need are made here, where no peer can be
    /// missing, and a broken setup fails at start instead of in the first step.
    fn warm_up(&self) -> Result<()> {
        let mut buffers = Vec::with_capacity(self.streams.len());
        for (stream, d) in self.streams.iter().zip(&self.devices) {
            let buffer = stream.alloc_zeros::<f32>(WARMUP_ELEMENTS).map_err(|e| {
                cuda_error(
                    &format!("allocating the NCCL warm-up buffer on cuda:{d}"),
                    e,
                )
            })?;
            buffers.push(buffer);
        }
        let comms: Vec<nccl_sys::ncclComm_t> = self.lock().comms.iter().map(|c| c.0).collect();
        nccl::group_start().map_err(|e| nccl_error("starting the NCCL warm-up group", e))?;
        let mut launched = Ok(());
        for ((buffer, stream), comm) in buffers.iter_mut().zip(&self.streams).zip(&comms) {
            let (ptr, _record) = buffer.device_ptr_mut(stream);
            let ptr = ptr as *mut c_void;
            // SAFETY: `ptr` is the live device allocation of `WARMUP_ELEMENTS` f32 just made on
            // this communicator's device; `buffers` keeps it until the streams are drained below,
            // and even on an early return cudarc frees it on this same stream, after the kernel.
            // `comm` is this reducer's communicator for that device, not yet shared with any
            // other thread, and `stream` a live stream of the same device.
            let result = unsafe {
                nccl::all_reduce(
                    ptr,
                    ptr,
                    WARMUP_ELEMENTS,
                    nccl_sys::ncclDataType_t::ncclFloat32,
                    nccl_sys::ncclRedOp_t::ncclSum,
                    *comm,
                    stream.cu_stream() as nccl_sys::cudaStream_t,
                )
            };
            if let Err(e) = result {
                launched = Err(nccl_error("queueing the NCCL warm-up all-reduce", e));
                break;
            }
        }
        // The group is closed even after a failed call, so NCCL's group state is left clean.
        let ended = nccl::group_end().map_err(|e| nccl_error("running the NCCL warm-up", e));
        launched.and(ended)?;
        let deadline = Instant::now() + self.timeout;
        for (stream, d) in self.streams.iter().zip(&self.devices) {
            match wait_for(stream, deadline, || false) {
                Ok(Waited::Done) => {}
                Ok(_) => {
                    return Err(parallel(format!(
                        "the NCCL warm-up all-reduce on cuda:{d} did not complete within {:?}",
                        self.timeout
                    )));
                }
                Err(e) => {
                    return Err(cuda_error(
                        &format!("the NCCL warm-up all-reduce on cuda:{d}"),
                        e,
                    ));
                }
            }
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn failed(&self) -> Option<String> {
        self.lock().failed.clone()
    }

    /// Stores `reason` unless a failure is already stored, aborts every communicator not inside
    /// a call, and returns the stored reason (the first failure, the same for every worker).
    fn fail(&self, reason: String) -> String {
        let mut state = self.lock();
        if state.failed.is_none() {
            tracing::error!("{reason}");
            state.failed = Some(reason);
        }
        let state = &mut *state;
        for (rank, comm) in state.comms.iter_mut().enumerate() {
            if !state.busy[rank] {
                abort_comm(rank, comm);
            }
        }
        state.failed.clone().unwrap_or_default()
    }

    /// Marks `rank` as inside an NCCL call and returns its communicator; fails after a failure.
    fn enter(&self, rank: usize) -> Result<nccl_sys::ncclComm_t> {
        let mut state = self.lock();
        if let Some(reason) = &state.failed {
            return Err(parallel(reason.clone()));
        }
        let comm = state.comms[rank].0;
        if comm.is_null() {
            return Err(parallel(format!(
                "the NCCL communicator of data-parallel worker {rank} was aborted"
            )));
        }
        state.busy[rank] = true;
        state.calls[rank] += 1;
        Ok(comm)
    }

    /// Ends `rank`'s NCCL call; if a failure came meanwhile, aborts its communicator (the abort
    /// skipped it) and returns the failure.
    fn leave(&self, rank: usize) -> Result<()> {
        let mut state = self.lock();
        state.busy[rank] = false;
        match state.failed.clone() {
            Some(reason) => {
                abort_comm(rank, &mut state.comms[rank]);
                Err(parallel(reason))
            }
            None => Ok(()),
        }
    }

    /// Why `rank`'s all-reduce did not complete in time: the ranks that never started it.
    fn timeout_reason(&self, rank: usize) -> String {
        let state = self.lock();
        let mine = state.calls[rank];
        let missing: Vec<String> = (0..state.calls.len())
            .filter(|&r| state.calls[r] < mine)
            .map(|r| format!("{r} (cuda:{})", self.devices[r]))
            .collect();
        if missing.is_empty() {
            format!(
                "the NCCL gradient all-reduce of data-parallel worker {rank} (cuda:{}) did not \
                 complete within {:?} although every worker started it: the workers disagree on \
                 the buckets (different models or configs) or a GPU or NCCL hangs",
                self.devices[rank], self.timeout
            )
        } else {
            format!(
                "data-parallel worker {} did not reach the gradient all-reduce within {:?} of \
                 worker {rank}: it crashed or hangs",
                missing.join(", "),
                self.timeout
            )
        }
    }

    /// After a failure, waits (at most `timeout` more) for `rank`'s stream, so the bucket is not
    /// handed back while an aborted kernel may still write it.
    fn drain(&self, rank: usize) {
        let deadline = Instant::now() + self.timeout;
        match wait_for(&self.streams[rank], deadline, || false) {
            Ok(Waited::Done) | Err(_) => {}
            Ok(_) => tracing::warn!(
                "the aborted NCCL all-reduce of data-parallel worker {rank} (cuda:{}) is still \
                 running after {:?}; its gradient bucket may still be written",
                self.devices[rank],
                self.timeout
            ),
        }
    }
}

impl BucketReducer for NcclReducer {
    fn all_reduce_sum(&self, rank: usize, bucket: &mut Tensor) -> Result<()> {
        let workers = self.devices.len();
        if rank >= workers {
            return Err(parallel(format!(
                "worker {rank} is not one of the reducer's {workers} workers"
            )));
        }
        if let Some(reason) = self.failed() {
            return Err(parallel(reason));
        }
        let device = self.devices[rank];
        if bucket.device() != Device::Cuda(device) {
            return Err(parallel(format!(
                "data-parallel worker {rank}: its gradient bucket is on {:?}, but the NCCL \
                 reducer runs this worker on cuda:{device}",
                bucket.device()
            )));
        }
        let dtype = match bucket.kind() {
            Kind::Float => nccl_sys::ncclDataType_t::ncclFloat32,
            Kind::BFloat16 => nccl_sys::ncclDataType_t::ncclBfloat16,
            other => {
                return Err(parallel(format!(
                    "data-parallel worker {rank}: the NCCL reducer sums Float or BFloat16 \
                     gradient buckets, not {other:?}"
                )));
            }
        };
        if !bucket.is_contiguous() {
            return Err(parallel(format!(
                "data-parallel worker {rank}: the gradient bucket given to the NCCL reducer is \
                 not contiguous"
            )));
        }
        let count = bucket.numel();
        if workers == 1 || count == 0 {
            return Ok(());
        }
        // The gradient kernels are on torch's current stream, which tch does not expose: wait for
        // the whole device (see the module doc).
        catch_unwind(AssertUnwindSafe(|| tch::Cuda::synchronize(device as i64))).map_err(
            |panic| {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown error".to_string());
                parallel(format!(
                    "data-parallel worker {rank}: synchronising cuda:{device} before the NCCL \
                     all-reduce failed: {what}"
                ))
            },
        )?;
        let stream = &self.streams[rank];
        let _restore = CurrentContext::save()?;
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| cuda_error(&format!("binding cuda:{device}"), e))?;
        let comm = self.enter(rank)?;
        let ptr = bucket.data_ptr();
        // SAFETY: `ptr` is the data of `bucket`, a live, contiguous tensor of `count` elements of
        // the kind `dtype` names, on cuda:`device`, the device of `comm` and `stream`; in place
        // (send = receive buffer) is allowed by NCCL. The device was synchronised above, so no
        // torch kernel still writes it, and this call does not return before the stream has
        // finished (or, after a failure, been drained), while `bucket` is borrowed, so the
        // memory outlives NCCL's use of it. `comm` is this rank's communicator, marked busy so
        // no other thread aborts it during the call.
        let queued = unsafe {
            nccl::all_reduce(
                ptr,
                ptr,
                count,
                dtype,
                nccl_sys::ncclRedOp_t::ncclSum,
                comm,
                stream.cu_stream() as nccl_sys::cudaStream_t,
            )
        };
        let left = self.leave(rank);
        if let Err(e) = queued {
            let reason = self.fail(nccl_error_text(
                &format!("data-parallel worker {rank} (cuda:{device}): ncclAllReduce"),
                &e,
            ));
            self.drain(rank);
            return Err(parallel(reason));
        }
        if let Err(e) = left {
            self.drain(rank);
            return Err(e);
        }
        let deadline = Instant::now() + self.timeout;
        match wait_for(stream, deadline, || self.lock().failed.is_some()) {
            // A kernel whose communicator was aborted also ends, without the sum: after a failure
            // the bucket is not trusted even if the all-reduce may have completed first.
            Ok(Waited::Done) => match self.failed() {
                Some(reason) => Err(parallel(reason)),
                None => Ok(()),
            },
            Ok(Waited::Failed) => {
                self.drain(rank);
                Err(parallel(self.failed().unwrap_or_default()))
            }
            Ok(Waited::TimedOut) => {
                let reason = self.fail(self.timeout_reason(rank));
                self.drain(rank);
                Err(parallel(reason))
            }
            Err(e) => Err(parallel(self.fail(format!(
                "the NCCL gradient all-reduce of data-parallel worker {rank} (cuda:{device}) \
                 failed: {e}"
            )))),
        }
    }

    fn abort(&self, reason: String) {
        self.fail(reason);
    }

    fn workers(&self) -> usize {
        self.devices.len()
    }
}

impl Drop for NcclReducer {
    /// Aborts rather than destroys the communicators: every call has waited for its stream, so no
    /// work is pending, and `ncclCommAbort` is local to each communicator, where
    /// `ncclCommDestroy` may wait for the peers' communicators, which this one thread drops in turn.
    fn drop(&mut self) {
        // Dropping the streams binds their contexts to this thread: restore its own afterwards.
        let restore = CurrentContext::save().ok();
        let state = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for (rank, comm) in state.comms.iter_mut().enumerate() {
            abort_comm(rank, comm);
        }
        drop(std::mem::take(&mut self.streams));
        drop(restore);
    }
}

/// How waiting for a stream ended.
enum Waited {
    Done,
    TimedOut,
    /// `failed()` turned true (another worker failed or the reducer was aborted).
    Failed,
}

/// Polls `stream` until its work is done, `deadline` passes or `failed()` is true: a few polls
/// that only yield the thread (a short all-reduce), then sleeps that double up to
/// [`MAX_POLL_PAUSE`].
fn wait_for(
    stream: &CudaStream,
    deadline: Instant,
    failed: impl Fn() -> bool,
) -> std::result::Result<Waited, DriverError> {
    stream.context().bind_to_thread()?;
    let mut polls = 0u32;
    let mut pause = Duration::from_micros(8);
    loop {
        // SAFETY: `stream` is a live stream created by this reducer on its device's context,
        // bound above; cuStreamQuery only reads whether its queued work has finished.
        match unsafe { cu::cuStreamQuery(stream.cu_stream()) } {
            cu::CUresult::CUDA_SUCCESS => return Ok(Waited::Done),
            cu::CUresult::CUDA_ERROR_NOT_READY => {}
            error => return Err(DriverError(error)),
        }
        if failed() {
            return Ok(Waited::Failed);
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(Waited::TimedOut);
        }
        if polls < SPIN_POLLS {
            polls += 1;
            std::thread::yield_now();
        } else {
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(MAX_POLL_PAUSE);
        }
    }
}

/// Aborts `comm` unless already aborted (NCCL also stops its kernels still waiting for peers).
fn abort_comm(rank: usize, comm: &mut Comm) {
    if comm.0.is_null() {
        return;
    }
    let raw = std::mem::replace(&mut comm.0, std::ptr::null_mut());
    // SAFETY: `raw` is a communicator made by ncclCommInitAll and not yet aborted (it is nulled
    // above, under the caller's `&mut`, so it is aborted once); no thread is inside an NCCL call
    // on it (callers skip busy ranks) and none uses it afterwards (null means aborted).
    if let Err(e) = unsafe { nccl::comm_abort(raw) } {
        tracing::warn!(
            "{}",
            nccl_error_text(
                &format!("aborting the NCCL communicator of data-parallel worker {rank}"),
                &e
            )
        );
    }
}

/// Whether cudarc can load a library: `check` is its `is_culib_present`.
fn present(check: unsafe fn() -> bool) -> bool {
    // SAFETY: `check` is cudarc's `is_culib_present`, which only dlopen()s (and closes)
    // candidate names of its library and looks up its symbols; the libraries' initialisers are
    // safe to run (libtorch_cuda loads the same libraries).
    catch_unwind(|| unsafe { check() }).unwrap_or(false)
}

/// Total memory of CUDA device `index` (numbered as libtorch numbers them, after
/// `CUDA_VISIBLE_DEVICES`), from the driver; `None` when the driver cannot be loaded or does not
/// know the device.
pub fn cuda_total_memory(index: usize) -> Option<u64> {
    if !present(cu::is_culib_present) {
        return None;
    }
    cu_result::init().ok()?;
    let device = cu_result::device::get(c_int::try_from(index).ok()?).ok()?;
    // SAFETY: `device` is a handle the driver just returned; the call only reads its attributes.
    let bytes = unsafe { cu_result::device::total_mem(device) }.ok()?;
    Some(bytes as u64)
}

/// cudarc panics when it cannot `dlopen` a library or finds a symbol missing in it; check first
/// (catching those panics) and say what to install.
fn check_libraries() -> Result<()> {
    if !present(cu::is_culib_present) {
        return Err(parallel(
            "the NCCL reducer could not load the CUDA driver (libcuda.so, libcuda.so.13 or \
             libcuda.so.1) with the CUDA 13.0 API: is an NVIDIA driver for CUDA 13 installed?"
                .into(),
        ));
    }
    if !present(nccl_sys::is_culib_present) {
        return Err(parallel(
            "the NCCL reducer could not load NCCL 2.28 or later: cudarc looks for libnccl.so \
             (and libnccl.so.13/11/10/1) but not libnccl.so.2, the only name the torch wheel \
             ships. Link it, e.g. `ln -s libnccl.so.2 \
             .venv/lib/python3*/site-packages/nvidia/nccl/lib/libnccl.so` and put that folder \
             on LD_LIBRARY_PATH (or the link in the torch lib folder, the binaries' RUNPATH), or \
             install the system's libnccl-dev"
                .into(),
        ));
    }
    Ok(())
}

/// Restores the CUDA context that was current on this thread when it was saved.
struct CurrentContext(Option<cu::CUcontext>);

impl CurrentContext {
    fn save() -> Result<CurrentContext> {
        cu_result::ctx::get_current()
            .map(CurrentContext)
            .map_err(|e| cuda_error("reading the thread's CUDA context", e))
    }
}

impl Drop for CurrentContext {
    fn drop(&mut self) {
        let ctx = self.0.unwrap_or(std::ptr::null_mut());
        // SAFETY: `ctx` was current on this thread when saved: a primary context, retained by
        // the CUDA runtime (torch) or by this reducer for the life of the process or reducer,
        // or null (no context), which unbinds.
        if let Err(e) = unsafe { cu_result::ctx::set_current(ctx) } {
            tracing::warn!("restoring the thread's CUDA context after NCCL: {e}");
        }
    }
}

fn parallel(message: String) -> Error {
    Error::Parallel(message)
}

fn cuda_error(what: &str, e: DriverError) -> Error {
    parallel(format!("{what}: CUDA error {e}"))
}

fn nccl_error(what: &str, e: NcclError) -> Error {
    parallel(nccl_error_text(what, &e))
}

fn nccl_error_text(what: &str, e: &NcclError) -> String {
    // SAFETY: ncclGetErrorString returns a pointer to a static NUL-terminated string for any
    // result code (checked for null all the same).
    let text = unsafe {
        let s = nccl_sys::ncclGetErrorString(e.0);
        if s.is_null() {
            String::new()
        } else {
            CStr::from_ptr(s).to_string_lossy().into_owned()
        }
    };
    format!("{what}: NCCL error {:?}: {text}", e.0)
}
