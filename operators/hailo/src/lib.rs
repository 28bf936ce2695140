//! The Hailo-8 NPU backend of primespark's anomaly scoring: runs a HEF (the ONNX model compiled
//! with Hailo's Dataflow Compiler) through HailoRT's C API, with the quantization done in Rust
//! by `primespark_operators::inference::quant` (device-independent, tested everywhere).
//!
//! This crate is the project's only FFI: it lives apart from `primespark-operators` (whose
//! operators do no I/O) and is built only with the binary's `hailo` feature, which links
//! libhailort. It implements `primespark_operators::inference::Backend`.
//!
//! Life of a model:
//! - `HailoBackend::open` creates one vdevice with HailoRT's defaults, which include the
//!   round-robin network-group scheduler: HailoRT switches between loaded models by itself,
//!   so nothing is activated by hand. The default vdevice owns the device exclusively, so open
//!   the backend once per process and clone it (clones share the vdevice).
//! - `Backend::load` creates the HEF, configures its network group on the vdevice and
//!   creates one input and one output vstream in the HEF's own (quantized) format.
//! - `Model::run` quantizes the batch with the vstreams' `qp_scale`/`qp_zp`, writes one
//!   frame per sample from a helper thread while reading the scores on the calling thread
//!   (HailoRT's own pattern, so a batch longer than the vstream queues cannot deadlock), and
//!   dequantizes the scores.
//!
//! HailoRT's C API cannot release a configured network group; the vdevice keeps each one
//! until the vdevice itself is released. A model's group is therefore handed to the next load
//! of the same (unchanged) HEF once the model is dropped, so a model cache that evicts and
//! reloads does not pile up groups on the device.
//!
//! FFI: the functions come from `hailort-sys` where its declarations match `hailort.h`
//! (hailo-ai/hailort). Several vstream functions are missing from `hailort-sys` 0.1.1 or
//! declared there under names libhailort does not export (`hailo_input_vstream_write` for
//! `hailo_vstream_write_raw_buffer`, singular `hailo_release_input_vstream`, ...), so they are
//! declared from the header in the private `ffi` module below.
//! `hailo_init_configure_params_by_vdevice` is declared in `hailort-sys` with its two handles
//! swapped, and the configure-params struct changed between HailoRT releases, so the network
//! group is configured with HailoRT's defaults (null params) instead.

// This crate is the FFI boundary: every HailoRT call is `unsafe`. Each unsafe block says what
// it relies on; nothing unsafe leaves this file.
#![allow(unsafe_code)]
#![cfg(feature = "device")]

use std::ffi::CString;
use std::os::raw::c_void;
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::SystemTime;

use hailort_sys as sys;
use tracing::{debug, info, warn};

use primespark_operators::inference::quant::{
    self, FrameLayout, HailoStatus, QuantInfo, ValueType,
};
use primespark_operators::inference::{check_batch, Backend, InferenceError, Model, ModelSpec};

/// The backend's name in logs and metrics.
const BACKEND: &str = "hailo";

/// Room for vstream params; a HEF with more inputs or outputs than this fails to load (and
/// this backend takes exactly one of each anyway).
const MAX_VSTREAMS: usize = 16;

/// Room for device ids when scanning; more devices than this still count as present.
const MAX_SCAN: usize = 16;

/// How long a vstream read or write waits. HailoRT's default is 10 s; the anomaly model takes
/// microseconds, so a stall this long means a stuck device, and the batch should go to the
/// CPU fallback sooner.
const VSTREAM_TIMEOUT_MS: u32 = 2_000;

/// HailoRT functions that `hailort-sys` 0.1.1 lacks or declares under the wrong name,
/// declared from `hailort.h` (`group_vstream_functions`). The types come from `hailort-sys`,
/// whose layouts for them match the header.
mod ffi {
    use std::os::raw::c_void;

    use hailort_sys::{
        hailo_configured_network_group, hailo_format_t, hailo_format_type_t, hailo_input_vstream,
        hailo_input_vstream_params_by_name_t, hailo_output_vstream,
        hailo_output_vstream_params_by_name_t, hailo_quant_info_t, hailo_status,
    };

    #[link(name = "hailort")]
    unsafe extern "C" {
        pub fn hailo_make_input_vstream_params(
            network_group: hailo_configured_network_group,
            unused: bool,
            format_type: hailo_format_type_t,
            input_params: *mut hailo_input_vstream_params_by_name_t,
            input_params_count: *mut usize,
        ) -> hailo_status;

        pub fn hailo_make_output_vstream_params(
            network_group: hailo_configured_network_group,
            unused: bool,
            format_type: hailo_format_type_t,
            output_params: *mut hailo_output_vstream_params_by_name_t,
            output_params_count: *mut usize,
        ) -> hailo_status;

        pub fn hailo_get_input_vstream_frame_size(
            input_vstream: hailo_input_vstream,
            frame_size: *mut usize,
        ) -> hailo_status;

        pub fn hailo_get_output_vstream_frame_size(
            output_vstream: hailo_output_vstream,
            frame_size: *mut usize,
        ) -> hailo_status;

        pub fn hailo_get_input_vstream_user_format(
            input_vstream: hailo_input_vstream,
            user_buffer_format: *mut hailo_format_t,
        ) -> hailo_status;

        pub fn hailo_get_output_vstream_user_format(
            output_vstream: hailo_output_vstream,
            user_buffer_format: *mut hailo_format_t,
        ) -> hailo_status;

        pub fn hailo_get_input_vstream_quant_infos(
            vstream: hailo_input_vstream,
            quant_infos: *mut hailo_quant_info_t,
            quant_infos_count: *mut usize,
        ) -> hailo_status;

        pub fn hailo_vstream_write_raw_buffer(
            input_vstream: hailo_input_vstream,
            buffer: *const c_void,
            buffer_size: usize,
        ) -> hailo_status;

        pub fn hailo_vstream_read_raw_buffer(
            output_vstream: hailo_output_vstream,
            buffer: *mut c_void,
            buffer_size: usize,
        ) -> hailo_status;

        pub fn hailo_clear_input_vstreams(
            input_vstreams: *const hailo_input_vstream,
            inputs_count: usize,
        ) -> hailo_status;

        pub fn hailo_clear_output_vstreams(
            output_vstreams: *const hailo_output_vstream,
            outputs_count: usize,
        ) -> hailo_status;

        pub fn hailo_release_input_vstreams(
            input_vstreams: *const hailo_input_vstream,
            inputs_count: usize,
        ) -> hailo_status;

        pub fn hailo_release_output_vstreams(
            output_vstreams: *const hailo_output_vstream,
            outputs_count: usize,
        ) -> hailo_status;
    }
}

/// Maps a HailoRT status to `Ok` or [`InferenceError::Hailo`].
fn ok(function: &'static str, status: sys::hailo_status) -> Result<(), InferenceError> {
    // `hailo_status` is a C enum of non-negative codes; the bits carry over unchanged.
    quant::check(function, status.cast_unsigned())
}

/// The Hailo-8 NPU, through one HailoRT vdevice. Clones share the vdevice.
#[derive(Clone)]
pub struct HailoBackend {
    device: Arc<Mutex<Device>>,
}

impl HailoBackend {
    /// Opens the Hailo devices of this host as one vdevice, with HailoRT's defaults (all
    /// devices, round-robin scheduler). Fails with [`InferenceError::NoDevice`] when no device
    /// is found, and with [`InferenceError::Hailo`] when one is found but cannot be opened
    /// (for example `HAILO_DEVICE_IN_USE` when another process holds it).
    pub fn open() -> Result<Self, InferenceError> {
        let mut vdevice: sys::hailo_vdevice = ptr::null_mut();
        // SAFETY: null params is documented as "use the defaults"; `vdevice` is a valid place
        // for the out handle.
        let status = unsafe { sys::hailo_create_vdevice(ptr::null_mut(), &mut vdevice) };
        if let Err(err) = ok("hailo_create_vdevice", status) {
            if !Self::device_present() {
                return Err(InferenceError::NoDevice(format!(
                    "hailo_scan_devices found no Hailo device ({err}); \
                     is the hailo_pci driver loaded?"
                )));
            }
            return Err(err);
        }
        if vdevice.is_null() {
            return Err(InferenceError::NoDevice(
                "hailo_create_vdevice succeeded but returned no vdevice".to_owned(),
            ));
        }

        let mut version = sys::hailo_version_t {
            major: 0,
            minor: 0,
            revision: 0,
        };
        // SAFETY: `version` is a valid place for the library version.
        let status = unsafe { sys::hailo_get_library_version(&mut version) };
        let hailort = if status == sys::HAILO_SUCCESS {
            format!("{}.{}.{}", version.major, version.minor, version.revision)
        } else {
            "unknown".to_owned()
        };
        info!(%hailort, "opened the Hailo vdevice");

        Ok(HailoBackend {
            device: Arc::new(Mutex::new(Device {
                vdevice,
                groups: Vec::new(),
            })),
        })
    }

    /// Whether HailoRT finds at least one Hailo device on this host. False on any error,
    /// including a missing driver: the caller then uses the CPU.
    pub fn device_present() -> bool {
        let mut ids = [sys::hailo_device_id_t {
            id: [0; sys::HAILO_MAX_DEVICE_ID_LENGTH],
        }; MAX_SCAN];
        let mut count = ids.len();
        // SAFETY: HailoRT requires null scan params; `ids` has room for `count` device ids.
        let status =
            unsafe { sys::hailo_scan_devices(ptr::null_mut(), ids.as_mut_ptr(), &mut count) };
        match status {
            sys::HAILO_SUCCESS => count > 0,
            // More devices than `ids` holds.
            sys::HAILO_INSUFFICIENT_BUFFER => true,
            other => {
                debug!(
                    status = %HailoStatus(other.cast_unsigned()),
                    "scanning for Hailo devices failed"
                );
                false
            }
        }
    }
}

impl Backend for HailoBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn load(&self, spec: &ModelSpec) -> Result<Box<dyn Model>, InferenceError> {
        let model = &*spec.name;
        let Some(hef) = spec.hef.as_deref() else {
            return Err(load_error(
                model,
                "no HEF path: the Hailo-8 runs a HEF compiled from the ONNX model with \
                 Hailo's Dataflow Compiler; set the model's HEF path or use the CPU backend"
                    .to_owned(),
            ));
        };
        let meta = std::fs::metadata(hef)
            .map_err(|e| load_error(model, format!("reading HEF {}: {e}", hef.display())))?;
        let key = HefKey {
            path: hef.to_owned(),
            len: meta.len(),
            modified: meta.modified().ok(),
        };

        // Configuring and creating vstreams hold the lock: other threads may be loading onto
        // the same vdevice, and the group must not be handed out twice.
        let (group, streams) = {
            let mut device = lock(&self.device);
            let group = device.acquire(model, key)?;
            let network_group = device.groups[group].network_group;
            match Streams::open(model, spec.inputs, network_group) {
                Ok(streams) => (group, streams),
                Err(err) => {
                    device.groups[group].in_use = false;
                    return Err(err);
                }
            }
        };
        info!(
            model,
            hef = %hef.display(),
            input = ?streams.input_type,
            input_frame_bytes = streams.input_layout.frame_size,
            output = ?streams.output_type,
            output_frame_bytes = streams.output_layout.frame_size,
            "model loaded on the Hailo NPU"
        );

        Ok(Box::new(HailoModel {
            name: model.to_owned(),
            inputs: spec.inputs,
            streams,
            _lease: GroupLease {
                device: Arc::clone(&self.device),
                group,
            },
            broken: false,
            encoded: Vec::new(),
            in_frames: Vec::new(),
            out_frames: Vec::new(),
            out_values: Vec::new(),
        }))
    }
}

/// An [`InferenceError::Load`] of this backend.
fn load_error(model: &str, reason: String) -> InferenceError {
    InferenceError::Load {
        model: model.to_owned(),
        backend: BACKEND,
        reason,
    }
}

/// An [`InferenceError::Run`] of this backend.
fn run_error(model: &str, reason: String) -> InferenceError {
    InferenceError::Run {
        model: model.to_owned(),
        backend: BACKEND,
        reason,
    }
}

/// Locks the shared device state.
fn lock(device: &Mutex<Device>) -> MutexGuard<'_, Device> {
    // Every change under the lock is a single push or flag, so a panic elsewhere while the
    // lock was held cannot leave the state half-changed: a poisoned lock is still usable.
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The vdevice and the network groups configured on it, shared by the backend and its models.
struct Device {
    vdevice: sys::hailo_vdevice,
    /// Only ever grows, so an index stays valid for the life of the device.
    groups: Vec<Group>,
}

// SAFETY: the handles are heap objects of libhailort, not tied to the thread that created
// them, and `Device` is only reached through a `Mutex`, so one thread at a time passes them
// to HailoRT.
unsafe impl Send for Device {}

/// A HEF configured on the vdevice.
struct Group {
    key: HefKey,
    hef: sys::hailo_hef,
    network_group: sys::hailo_configured_network_group,
    /// A loaded model has vstreams on it.
    in_use: bool,
}

/// Identifies a HEF file's contents well enough to reuse its network group: a file replaced
/// at the same path (new size or modification time) is configured anew.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HefKey {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
}

impl Device {
    /// Index of a network group configured from `key`'s HEF that no model uses, configuring
    /// the HEF when there is none; the group is marked in use.
    fn acquire(&mut self, model: &str, key: HefKey) -> Result<usize, InferenceError> {
        if let Some(index) = self.groups.iter().position(|g| !g.in_use && g.key == key) {
            debug!(model, hef = %key.path.display(), "reusing a configured network group");
            self.groups[index].in_use = true;
            return Ok(index);
        }
        let (hef, network_group) = configure(self.vdevice, model, &key.path)?;
        self.groups.push(Group {
            key,
            hef,
            network_group,
            in_use: true,
        });
        Ok(self.groups.len() - 1)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // Every model holds an `Arc` to this device, so none is left: no vstream remains.
        for group in self.groups.drain(..) {
            // SAFETY: `hef` came from `hailo_create_hef_file` and is released once, here.
            let status = unsafe { sys::hailo_release_hef(group.hef) };
            if let Err(err) = ok("hailo_release_hef", status) {
                warn!(hef = %group.key.path.display(), %err, "releasing a HEF failed");
            }
        }
        // SAFETY: `vdevice` came from `hailo_create_vdevice` and is released once, here; this
        // also frees the configured network groups, which HailoRT keeps in the vdevice.
        let status = unsafe { sys::hailo_release_vdevice(self.vdevice) };
        match ok("hailo_release_vdevice", status) {
            Ok(()) => debug!("closed the Hailo vdevice"),
            Err(err) => warn!(%err, "releasing the Hailo vdevice failed"),
        }
    }
}

/// Creates the HEF at `path` and configures its network group on `vdevice` with HailoRT's
/// default parameters.
fn configure(
    vdevice: sys::hailo_vdevice,
    model: &str,
    path: &Path,
) -> Result<(sys::hailo_hef, sys::hailo_configured_network_group), InferenceError> {
    let c_path = path
        .to_str()
        .and_then(|p| CString::new(p).ok())
        .ok_or_else(|| {
            load_error(
                model,
                format!(
                    "HEF path {} is not a UTF-8 string without NUL",
                    path.display()
                ),
            )
        })?;
    let mut hef: sys::hailo_hef = ptr::null_mut();
    // SAFETY: `c_path` is NUL-terminated and outlives the call; `hef` is a valid place for
    // the out handle.
    let status = unsafe { sys::hailo_create_hef_file(&mut hef, c_path.as_ptr()) };
    ok("hailo_create_hef_file", status)?;

    let mut groups: [sys::hailo_configured_network_group; sys::HAILO_MAX_NETWORK_GROUPS] =
        [ptr::null_mut(); sys::HAILO_MAX_NETWORK_GROUPS];
    let mut count = groups.len();
    // SAFETY: `vdevice` and `hef` are live handles; null params is accepted by HailoRT and
    // means the default configuration of every network group in the HEF; `groups` has room
    // for `count` handles.
    let status = unsafe {
        sys::hailo_configure_vdevice(
            vdevice,
            hef,
            ptr::null_mut(),
            groups.as_mut_ptr(),
            &mut count,
        )
    };
    let configured = ok("hailo_configure_vdevice", status).and_then(|()| {
        if count == 1 {
            Ok(groups[0])
        } else {
            Err(load_error(
                model,
                format!(
                    "HEF {} holds {count} network groups; one is expected",
                    path.display()
                ),
            ))
        }
    });
    match configured {
        Ok(network_group) => Ok((hef, network_group)),
        Err(err) => {
            // SAFETY: `hef` came from `hailo_create_hef_file` above and is not kept.
            let status = unsafe { sys::hailo_release_hef(hef) };
            if let Err(release) = ok("hailo_release_hef", status) {
                warn!(model, %release, "releasing a HEF failed");
            }
            Err(err)
        }
    }
}

/// A model's claim on its network group; the group is free for the next load once the model
/// (and with it its vstreams) is gone. Keeps the vdevice alive.
struct GroupLease {
    device: Arc<Mutex<Device>>,
    group: usize,
}

impl Drop for GroupLease {
    fn drop(&mut self) {
        if let Some(group) = lock(&self.device).groups.get_mut(self.group) {
            group.in_use = false;
        }
    }
}

/// An input vstream, released on drop.
struct InputVStream(sys::hailo_input_vstream);

/// An output vstream, released on drop.
struct OutputVStream(sys::hailo_output_vstream);

// SAFETY: a vstream is owned by exactly one `HailoModel`, which its owner (the executor) runs
// on one thread at a time; HailoRT does not tie vstreams to the thread that created them.
unsafe impl Send for InputVStream {}
// SAFETY: as for `InputVStream`.
unsafe impl Send for OutputVStream {}

impl Drop for InputVStream {
    fn drop(&mut self) {
        // SAFETY: the handle came from `hailo_create_input_vstreams` and is released once.
        let status = unsafe { ffi::hailo_release_input_vstreams(&self.0, 1) };
        if let Err(err) = ok("hailo_release_input_vstreams", status) {
            warn!(%err, "releasing an input vstream failed");
        }
    }
}

impl Drop for OutputVStream {
    fn drop(&mut self) {
        // SAFETY: the handle came from `hailo_create_output_vstreams` and is released once.
        let status = unsafe { ffi::hailo_release_output_vstreams(&self.0, 1) };
        if let Err(err) = ok("hailo_release_output_vstreams", status) {
            warn!(%err, "releasing an output vstream failed");
        }
    }
}

/// The input vstream handle lent to the writer thread of one batch.
#[derive(Clone, Copy)]
struct WriterHandle(sys::hailo_input_vstream);

// SAFETY: a `WriterHandle` only exists inside `HailoModel::transfer`, which gives it to one
// writer thread and joins that thread before returning; meanwhile nothing else uses the
// input vstream. HailoRT vstreams may be driven from any thread (its examples write from one
// thread and read from another).
unsafe impl Send for WriterHandle {}

/// A zeroed params entry for HailoRT to fill.
fn empty_vstream_params() -> sys::hailo_vstream_params_t {
    sys::hailo_vstream_params_t {
        user_buffer_format: sys::hailo_format_t {
            type_: sys::HAILO_FORMAT_TYPE_AUTO,
            order: sys::HAILO_FORMAT_ORDER_AUTO,
            flags: sys::HAILO_FORMAT_FLAGS_NONE,
        },
        timeout_ms: 0,
        queue_size: 0,
        vstream_stats_flags: sys::HAILO_VSTREAM_STATS_NONE,
        pipeline_elements_stats_flags: 0,
    }
}

/// The host-side value type of a vstream buffer.
fn value_type(
    model: &str,
    side: &str,
    format: sys::hailo_format_t,
) -> Result<ValueType, InferenceError> {
    match format.type_ {
        sys::HAILO_FORMAT_TYPE_UINT8 => Ok(ValueType::U8),
        sys::HAILO_FORMAT_TYPE_UINT16 => Ok(ValueType::U16),
        sys::HAILO_FORMAT_TYPE_FLOAT32 => Ok(ValueType::F32),
        other => Err(load_error(
            model,
            format!(
                "the HEF's {side} vstream has format type {other}, not uint8, uint16 or float32"
            ),
        )),
    }
}

/// The single quantization of a vstream, from HailoRT's list (one entry, or one per feature
/// when the HEF quantizes features separately, which this backend does not support).
fn single_quant(
    model: &str,
    side: &str,
    ty: ValueType,
    infos: &[sys::hailo_quant_info_t],
) -> Result<QuantInfo, InferenceError> {
    // float32 buffers are (de)quantized by HailoRT; the parameters are never used.
    if ty == ValueType::F32 {
        return Ok(QuantInfo {
            scale: 1.0,
            zero_point: 0.0,
        });
    }
    let Some(first) = infos.first() else {
        return Err(load_error(
            model,
            format!("HailoRT reports no quantization for the {side} vstream"),
        ));
    };
    if infos
        .iter()
        .any(|q| q.qp_scale != first.qp_scale || q.qp_zp != first.qp_zp)
    {
        return Err(load_error(
            model,
            format!(
                "the HEF quantizes the {side} per feature ({} scales); recompile it with one \
                 quantization for the whole {side}",
                infos.len()
            ),
        ));
    }
    QuantInfo::new(first.qp_scale, first.qp_zp)
        .map_err(|err| load_error(model, format!("{side} vstream: {err}")))
}

/// Quant infos from a HailoRT getter that reports the needed length when the buffer is short.
fn quant_infos(
    function: &'static str,
    mut get: impl FnMut(*mut sys::hailo_quant_info_t, *mut usize) -> sys::hailo_status,
) -> Result<Vec<sys::hailo_quant_info_t>, InferenceError> {
    let empty = sys::hailo_quant_info_t {
        qp_zp: 0.0,
        qp_scale: 0.0,
        limvals_min: 0.0,
        limvals_max: 0.0,
    };
    let mut infos = vec![empty; 8];
    let mut count = infos.len();
    let mut status = get(infos.as_mut_ptr(), &mut count);
    if status == sys::HAILO_INSUFFICIENT_BUFFER && count > infos.len() {
        infos.resize(count, empty);
        status = get(infos.as_mut_ptr(), &mut count);
    }
    ok(function, status)?;
    infos.truncate(count);
    Ok(infos)
}

/// A model's vstreams and how its samples map onto them.
struct Streams {
    input: InputVStream,
    output: OutputVStream,
    input_type: ValueType,
    output_type: ValueType,
    input_quant: QuantInfo,
    output_quant: QuantInfo,
    input_layout: FrameLayout,
    output_layout: FrameLayout,
}

impl Streams {
    /// Creates one input and one output vstream on `network_group` in the HEF's own format,
    /// and checks that a frame carries one sample of `inputs` features in and one score out.
    fn open(
        model: &str,
        inputs: usize,
        network_group: sys::hailo_configured_network_group,
    ) -> Result<Self, InferenceError> {
        let input = Self::create_input(model, network_group)?;
        let output = Self::create_output(model, network_group)?;

        let mut format = empty_vstream_params().user_buffer_format;
        // SAFETY: `input.0` is a live input vstream; `format` is a valid place for the format.
        let status = unsafe { ffi::hailo_get_input_vstream_user_format(input.0, &mut format) };
        ok("hailo_get_input_vstream_user_format", status)?;
        let input_type = value_type(model, "input", format)?;
        // SAFETY: `output.0` is a live output vstream; `format` is a valid place for the format.
        let status = unsafe { ffi::hailo_get_output_vstream_user_format(output.0, &mut format) };
        ok("hailo_get_output_vstream_user_format", status)?;
        let output_type = value_type(model, "output", format)?;

        let mut input_frame = 0usize;
        // SAFETY: `input.0` is a live input vstream; `input_frame` is a valid place for the size.
        let status = unsafe { ffi::hailo_get_input_vstream_frame_size(input.0, &mut input_frame) };
        ok("hailo_get_input_vstream_frame_size", status)?;
        let mut output_frame = 0usize;
        // SAFETY: `output.0` is a live output vstream; `output_frame` is a valid place for
        // the size.
        let status =
            unsafe { ffi::hailo_get_output_vstream_frame_size(output.0, &mut output_frame) };
        ok("hailo_get_output_vstream_frame_size", status)?;

        let infos = quant_infos("hailo_get_input_vstream_quant_infos", |infos, count| {
            // SAFETY: `input.0` is a live input vstream; `quant_infos` passes a buffer with
            // room for `*count` entries.
            unsafe { ffi::hailo_get_input_vstream_quant_infos(input.0, infos, count) }
        })?;
        let input_quant = single_quant(model, "input", input_type, &infos)?;
        let infos = quant_infos("hailo_get_output_vstream_quant_infos", |infos, count| {
            // SAFETY: `output.0` is a live output vstream; `quant_infos` passes a buffer with
            // room for `*count` entries.
            unsafe { sys::hailo_get_output_vstream_quant_infos(output.0, infos, count) }
        })?;
        let output_quant = single_quant(model, "output", output_type, &infos)?;

        let input_layout = FrameLayout::new(model, inputs, input_frame, input_type.bytes())?;
        let frame_values = input_frame / input_type.bytes();
        if frame_values > inputs {
            warn!(
                model,
                frame_values,
                inputs,
                "the HEF's input frame holds more values than the model's features; \
                 padding each sample with zeros"
            );
        }
        let scores = output_frame / output_type.bytes();
        if scores != 1 || !output_frame.is_multiple_of(output_type.bytes()) {
            return Err(InferenceError::Shape {
                model: model.to_owned(),
                reason: format!(
                    "the HEF's output frame is {output_frame} bytes of {output_type:?} values; \
                     the pipeline reads one score per sample"
                ),
            });
        }
        let output_layout = FrameLayout::new(model, 1, output_frame, output_type.bytes())?;

        Ok(Streams {
            input,
            output,
            input_type,
            output_type,
            input_quant,
            output_quant,
            input_layout,
            output_layout,
        })
    }

    /// The network group's single input vstream, in the HEF's own format.
    fn create_input(
        model: &str,
        network_group: sys::hailo_configured_network_group,
    ) -> Result<InputVStream, InferenceError> {
        let mut params = [sys::hailo_input_vstream_params_by_name_t {
            name: [0; sys::HAILO_MAX_STREAM_NAME_SIZE],
            params: empty_vstream_params(),
        }; MAX_VSTREAMS];
        let mut count = params.len();
        // SAFETY: `network_group` is a live configured network group; `params` has room for
        // `count` entries laid out as `hailort.h` declares them.
        let status = unsafe {
            ffi::hailo_make_input_vstream_params(
                network_group,
                false,
                // AUTO is the HEF's own (quantized) type: HailoRT neither scales nor converts.
                sys::HAILO_FORMAT_TYPE_AUTO,
                params.as_mut_ptr(),
                &mut count,
            )
        };
        ok("hailo_make_input_vstream_params", status)?;
        if count != 1 {
            return Err(InferenceError::Shape {
                model: model.to_owned(),
                reason: format!("the HEF has {count} inputs; the pipeline feeds one"),
            });
        }
        params[0].params.timeout_ms = VSTREAM_TIMEOUT_MS;
        let mut vstream: sys::hailo_input_vstream = ptr::null_mut();
        // SAFETY: `params[0]` was filled by HailoRT for this network group; `vstream` has
        // room for the one handle asked for.
        let status = unsafe {
            sys::hailo_create_input_vstreams(network_group, params.as_ptr(), 1, &mut vstream)
        };
        ok("hailo_create_input_vstreams", status)?;
        Ok(InputVStream(vstream))
    }

    /// The network group's single output vstream, in the HEF's own format.
    fn create_output(
        model: &str,
        network_group: sys::hailo_configured_network_group,
    ) -> Result<OutputVStream, InferenceError> {
        let mut params = [sys::hailo_output_vstream_params_by_name_t {
            name: [0; sys::HAILO_MAX_STREAM_NAME_SIZE],
            params: empty_vstream_params(),
        }; MAX_VSTREAMS];
        let mut count = params.len();
        // SAFETY: `network_group` is a live configured network group; `params` has room for
        // `count` entries laid out as `hailort.h` declares them.
        let status = unsafe {
            ffi::hailo_make_output_vstream_params(
                network_group,
                false,
                sys::HAILO_FORMAT_TYPE_AUTO,
                params.as_mut_ptr(),
                &mut count,
            )
        };
        ok("hailo_make_output_vstream_params", status)?;
        if count != 1 {
            return Err(InferenceError::Shape {
                model: model.to_owned(),
                reason: format!("the HEF has {count} outputs; the pipeline reads one score"),
            });
        }
        params[0].params.timeout_ms = VSTREAM_TIMEOUT_MS;
        let mut vstream: sys::hailo_output_vstream = ptr::null_mut();
        // SAFETY: `params[0]` was filled by HailoRT for this network group; `vstream` has
        // room for the one handle asked for.
        let status = unsafe {
            sys::hailo_create_output_vstreams(network_group, params.as_ptr(), 1, &mut vstream)
        };
        ok("hailo_create_output_vstreams", status)?;
        Ok(OutputVStream(vstream))
    }
}

/// A model loaded on the Hailo NPU (see [`HailoBackend`]).
pub struct HailoModel {
    name: String,
    inputs: usize,
    // Fields drop in order: the vstreams go before the lease frees their network group.
    streams: Streams,
    /// Held for its `Drop`.
    _lease: GroupLease,
    /// A failed batch may have left frames in the vstreams that clearing could not remove;
    /// they would be read as the next batch's scores, so the model refuses to run.
    broken: bool,
    // Per-batch buffers, kept to avoid allocating on every batch.
    encoded: Vec<u8>,
    in_frames: Vec<u8>,
    out_frames: Vec<u8>,
    out_values: Vec<u8>,
}

impl HailoModel {
    /// Writes `in_frames` from a helper thread while reading as many frames into `out_frames`
    /// on this one. Reading concurrently keeps the output queue draining, so the input queue
    /// never blocks for good whatever the batch length.
    fn transfer(&mut self) -> Result<(), InferenceError> {
        let writer = WriterHandle(self.streams.input.0);
        let reader = self.streams.output.0;
        let in_size = self.streams.input_layout.frame_size;
        let out_size = self.streams.output_layout.frame_size;
        let in_frames = &self.in_frames;
        let out_frames = &mut self.out_frames;
        let model = &*self.name;
        thread::scope(|scope| {
            let written = thread::Builder::new()
                .name("hailo-writer".to_owned())
                .spawn_scoped(scope, move || write_frames(writer, in_frames, in_size))
                .map_err(|e| run_error(model, format!("starting the vstream writer: {e}")))?;
            let read = read_frames(reader, out_frames, out_size);
            let written = written
                .join()
                .unwrap_or_else(|_| Err(run_error(model, "the vstream writer panicked".into())));
            // A failed write makes the read time out: the write error is the cause.
            written.and(read)
        })
    }

    /// After a failed batch, drops what is left in the vstreams so that the next batch reads
    /// its own scores; if that fails, marks the model broken.
    fn clear(&mut self) {
        // SAFETY: the handle is a live input vstream that no other thread uses now.
        let status = unsafe { ffi::hailo_clear_input_vstreams(&self.streams.input.0, 1) };
        let cleared = ok("hailo_clear_input_vstreams", status).and_then(|()| {
            // SAFETY: the handle is a live output vstream that no other thread uses now, and
            // it is the network group's only output (all outputs of a group must be cleared
            // together).
            let status = unsafe { ffi::hailo_clear_output_vstreams(&self.streams.output.0, 1) };
            ok("hailo_clear_output_vstreams", status)
        });
        if let Err(err) = cleared {
            warn!(
                model = %self.name,
                %err,
                "clearing the vstreams after a failed batch failed; the model must be reloaded"
            );
            self.broken = true;
        }
    }
}

/// Writes `frames` to the input vstream, one frame of `frame_size` bytes per call.
fn write_frames(
    vstream: WriterHandle,
    frames: &[u8],
    frame_size: usize,
) -> Result<(), InferenceError> {
    for frame in frames.chunks_exact(frame_size) {
        // SAFETY: `vstream` is a live input vstream used by this thread only (see
        // `WriterHandle`); `frame` is `frame_size` readable bytes, the vstream's frame size.
        let status = unsafe {
            ffi::hailo_vstream_write_raw_buffer(
                vstream.0,
                frame.as_ptr().cast::<c_void>(),
                frame.len(),
            )
        };
        ok("hailo_vstream_write_raw_buffer", status)?;
    }
    Ok(())
}

/// Fills `frames` from the output vstream, one frame of `frame_size` bytes per call.
fn read_frames(
    vstream: sys::hailo_output_vstream,
    frames: &mut [u8],
    frame_size: usize,
) -> Result<(), InferenceError> {
    for frame in frames.chunks_exact_mut(frame_size) {
        // SAFETY: `vstream` is a live output vstream used by this thread only; `frame` is
        // `frame_size` writable bytes, the vstream's frame size.
        let status = unsafe {
            ffi::hailo_vstream_read_raw_buffer(
                vstream,
                frame.as_mut_ptr().cast::<c_void>(),
                frame.len(),
            )
        };
        ok("hailo_vstream_read_raw_buffer", status)?;
    }
    Ok(())
}

impl Model for HailoModel {
    fn name(&self) -> &str {
        &self.name
    }

    fn inputs(&self) -> usize {
        self.inputs
    }

    fn run(
        &mut self,
        features: &[f32],
        rows: usize,
        scores: &mut Vec<f32>,
    ) -> Result<(), InferenceError> {
        check_batch(&self.name, self.inputs, features, rows)?;
        if self.broken {
            return Err(run_error(
                &self.name,
                "an earlier HailoRT failure left frames of unknown samples in the vstreams; \
                 reload the model"
                    .to_owned(),
            ));
        }
        if rows == 0 {
            return Ok(());
        }

        let streams = &self.streams;
        self.encoded.clear();
        streams
            .input_quant
            .encode_into(streams.input_type, features, &mut self.encoded);
        self.in_frames.clear();
        let packed = streams
            .input_layout
            .pack(&self.name, &self.encoded, &mut self.in_frames)?;
        debug_assert_eq!(packed, rows);
        self.out_frames.clear();
        self.out_frames
            .resize(rows * streams.output_layout.frame_size, 0);

        if let Err(err) = self.transfer() {
            self.clear();
            return Err(err);
        }

        let streams = &self.streams;
        self.out_values.clear();
        let unpacked =
            streams
                .output_layout
                .unpack(&self.name, &self.out_frames, &mut self.out_values)?;
        debug_assert_eq!(unpacked, rows);
        streams
            .output_quant
            .decode_into(streams.output_type, &self.out_values, scores);
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The name table must stay in step with the codes in the bindings.
    #[test]
    fn status_names_match_hailort_sys() {
        use hailort_sys as sys;
        for (code, name) in [
            (sys::HAILO_SUCCESS, "HAILO_SUCCESS"),
            (sys::HAILO_INVALID_ARGUMENT, "HAILO_INVALID_ARGUMENT"),
            (sys::HAILO_TIMEOUT, "HAILO_TIMEOUT"),
            (sys::HAILO_INVALID_HEF, "HAILO_INVALID_HEF"),
            (
                sys::HAILO_DRIVER_OPERATION_FAILED,
                "HAILO_DRIVER_OPERATION_FAILED",
            ),
            (sys::HAILO_STREAM_ABORT, "HAILO_STREAM_ABORT"),
            (
                sys::HAILO_DRIVER_NOT_INSTALLED,
                "HAILO_DRIVER_NOT_INSTALLED",
            ),
            (
                sys::HAILO_STREAM_NOT_ACTIVATED,
                "HAILO_STREAM_NOT_ACTIVATED",
            ),
            (sys::HAILO_DEVICE_IN_USE, "HAILO_DEVICE_IN_USE"),
            (sys::HAILO_QUEUE_IS_FULL, "HAILO_QUEUE_IS_FULL"),
            (
                sys::HAILO_HEF_NOT_COMPATIBLE_WITH_DEVICE,
                "HAILO_HEF_NOT_COMPATIBLE_WITH_DEVICE",
            ),
            (
                sys::HAILO_DEVICE_TEMPORARILY_UNAVAILABLE,
                "HAILO_DEVICE_TEMPORARILY_UNAVAILABLE",
            ),
        ] {
            let status = HailoStatus(u32::try_from(code).unwrap());
            assert_eq!(status.name(), Some(name), "code {code}");
        }
        // The table ends where the bindings do.
        let past = u32::try_from(sys::HAILO_DEVICE_TEMPORARILY_UNAVAILABLE).unwrap() + 1;
        assert_eq!(HailoStatus(past).name(), None);
    }
}
