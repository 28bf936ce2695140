//! The device-independent half of the Hailo backend: HailoRT status codes, the uint8/uint16
//! quantization the NPU computes in, and the layout of samples in vstream frames.
//!
//! None of this touches HailoRT, so it is compiled and tested on every machine, with or
//! without the `hailo` feature; `hailo.rs` only moves the bytes made here through the FFI.
//!
//! The conventions follow HailoRT's C API (`hailort.h`, `hailo_quant_info_t`): a value `x` is
//! sent to the device as `x / qp_scale + qp_zp`, and a device value `q` means
//! `(q - qp_zp) * qp_scale`.

use std::fmt;

use super::InferenceError;

/// A HailoRT return code (`hailo_status`), named when printed.
///
/// Kept as a plain number so that [`InferenceError`] can carry it on builds without the
/// `hailo` feature, and so that codes added by a newer libhailort still print (as unknown).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HailoStatus(pub u32);

/// Names of the HailoRT status codes, indexed by code. Mirrors `hailort_sys::status` (0.1.1),
/// which mirrors `hailort.h`; a test under the `hailo` feature checks entries against the
/// bindings so the two cannot drift apart silently.
const STATUS_NAMES: [&str; 98] = [
    "HAILO_SUCCESS",
    "HAILO_UNINITIALIZED",
    "HAILO_INVALID_ARGUMENT",
    "HAILO_OUT_OF_HOST_MEMORY",
    "HAILO_TIMEOUT",
    "HAILO_INSUFFICIENT_BUFFER",
    "HAILO_INVALID_OPERATION",
    "HAILO_NOT_IMPLEMENTED",
    "HAILO_INTERNAL_FAILURE",
    "HAILO_DATA_ALIGNMENT_FAILURE",
    "HAILO_CHUNK_TOO_LARGE",
    "HAILO_INVALID_LOGGER_LEVEL",
    "HAILO_CLOSE_FAILURE",
    "HAILO_OPEN_FILE_FAILURE",
    "HAILO_FILE_OPERATION_FAILURE",
    "HAILO_UNSUPPORTED_CONTROL_PROTOCOL_VERSION",
    "HAILO_UNSUPPORTED_FW_VERSION",
    "HAILO_INVALID_CONTROL_RESPONSE",
    "HAILO_FW_CONTROL_FAILURE",
    "HAILO_ETH_FAILURE",
    "HAILO_ETH_INTERFACE_NOT_FOUND",
    "HAILO_ETH_RECV_FAILURE",
    "HAILO_ETH_SEND_FAILURE",
    "HAILO_INVALID_FIRMWARE",
    "HAILO_INVALID_CONTEXT_COUNT",
    "HAILO_INVALID_FRAME",
    "HAILO_INVALID_HEF",
    "HAILO_PCIE_NOT_SUPPORTED_ON_PLATFORM",
    "HAILO_INTERRUPTED_BY_SIGNAL",
    "HAILO_START_VDMA_CHANNEL_FAIL",
    "HAILO_SYNC_VDMA_BUFFER_FAIL",
    "HAILO_STOP_VDMA_CHANNEL_FAIL",
    "HAILO_CLOSE_VDMA_CHANNEL_FAIL",
    "HAILO_ATR_TABLES_CONF_VALIDATION_FAIL",
    "HAILO_EVENT_CREATE_FAIL",
    "HAILO_READ_EVENT_FAIL",
    "HAILO_DRIVER_OPERATION_FAILED",
    "HAILO_INVALID_FIRMWARE_MAGIC",
    "HAILO_INVALID_FIRMWARE_CODE_SIZE",
    "HAILO_INVALID_KEY_CERTIFICATE_SIZE",
    "HAILO_INVALID_CONTENT_CERTIFICATE_SIZE",
    "HAILO_MISMATCHING_FIRMWARE_BUFFER_SIZES",
    "HAILO_INVALID_FIRMWARE_CPU_ID",
    "HAILO_CONTROL_RESPONSE_MD5_MISMATCH",
    "HAILO_GET_CONTROL_RESPONSE_FAIL",
    "HAILO_GET_D2H_EVENT_MESSAGE_FAIL",
    "HAILO_MUTEX_INIT_FAIL",
    "HAILO_OUT_OF_DESCRIPTORS",
    "HAILO_UNSUPPORTED_OPCODE",
    "HAILO_USER_MODE_RATE_LIMITER_NOT_SUPPORTED",
    "HAILO_RATE_LIMIT_MAXIMUM_BANDWIDTH_EXCEEDED",
    "HAILO_ANSI_TO_UTF16_CONVERSION_FAILED",
    "HAILO_UTF16_TO_ANSI_CONVERSION_FAILED",
    "HAILO_UNEXPECTED_INTERFACE_INFO_FAILURE",
    "HAILO_UNEXPECTED_ARP_TABLE_FAILURE",
    "HAILO_MAC_ADDRESS_NOT_FOUND",
    "HAILO_NO_IPV4_INTERFACES_FOUND",
    "HAILO_SHUTDOWN_EVENT_SIGNALED",
    "HAILO_THREAD_ALREADY_ACTIVATED",
    "HAILO_THREAD_NOT_ACTIVATED",
    "HAILO_THREAD_NOT_JOINABLE",
    "HAILO_NOT_FOUND",
    "HAILO_COMMUNICATION_CLOSED",
    "HAILO_STREAM_ABORT",
    "HAILO_DRIVER_NOT_INSTALLED",
    "HAILO_NOT_AVAILABLE",
    "HAILO_TRAFFIC_CONTROL_FAILURE",
    "HAILO_INVALID_SECOND_STAGE",
    "HAILO_INVALID_PIPELINE",
    "HAILO_NETWORK_GROUP_NOT_ACTIVATED",
    "HAILO_VSTREAM_PIPELINE_NOT_ACTIVATED",
    "HAILO_OUT_OF_FW_MEMORY",
    "HAILO_STREAM_NOT_ACTIVATED",
    "HAILO_DEVICE_IN_USE",
    "HAILO_OUT_OF_PHYSICAL_DEVICES",
    "HAILO_INVALID_DEVICE_ARCHITECTURE",
    "HAILO_INVALID_DRIVER_VERSION",
    "HAILO_RPC_FAILED",
    "HAILO_INVALID_SERVICE_VERSION",
    "HAILO_NOT_SUPPORTED",
    "HAILO_NMS_BURST_INVALID_DATA",
    "HAILO_OUT_OF_HOST_CMA_MEMORY",
    "HAILO_QUEUE_IS_FULL",
    "HAILO_DMA_MAPPING_ALREADY_EXISTS",
    "HAILO_CANT_MEET_BUFFER_REQUIREMENTS",
    "HAILO_DRIVER_INVALID_RESPONSE",
    "HAILO_DRIVER_INVALID_IOCTL",
    "HAILO_DRIVER_TIMEOUT",
    "HAILO_DRIVER_INTERRUPTED",
    "HAILO_CONNECTION_REFUSED",
    "HAILO_DRIVER_WAIT_CANCELED",
    "HAILO_HEF_FILE_CORRUPTED",
    "HAILO_HEF_NOT_SUPPORTED",
    "HAILO_HEF_NOT_COMPATIBLE_WITH_DEVICE",
    "HAILO_INVALID_HEF_USE",
    "HAILO_OPERATION_ABORTED",
    "HAILO_DEVICE_NOT_CONNECTED",
    "HAILO_DEVICE_TEMPORARILY_UNAVAILABLE",
];

impl HailoStatus {
    /// `HAILO_SUCCESS`.
    pub const SUCCESS: HailoStatus = HailoStatus(0);

    /// The status's name in `hailort.h` (`HAILO_TIMEOUT`), or `None` for a code this build
    /// does not know.
    pub fn name(&self) -> Option<&'static str> {
        usize::try_from(self.0)
            .ok()
            .and_then(|code| STATUS_NAMES.get(code).copied())
    }

    /// Whether running the same batch on the NPU again later may succeed.
    ///
    /// Transient: the device or the HailoRT scheduler was busy, slow or switching network
    /// groups, or a wait was interrupted (timeouts, aborted or not-yet-activated streams, a
    /// full queue, a device in use or temporarily unavailable). Nothing about the model, the
    /// input or the host has to change, so the caller may fall back to the CPU for now and try
    /// the NPU again after a while.
    ///
    /// Everything else is fatal, including codes this build does not know: invalid
    /// arguments, a HEF that is corrupt or does not fit the device, a missing or mismatched
    /// driver or firmware, internal failures. Retrying repeats the failure, so the caller
    /// should stay on the CPU and report it.
    pub fn is_transient(&self) -> bool {
        matches!(
            self.name(),
            Some(
                "HAILO_TIMEOUT"
                    | "HAILO_INTERRUPTED_BY_SIGNAL"
                    | "HAILO_STREAM_ABORT"
                    | "HAILO_NETWORK_GROUP_NOT_ACTIVATED"
                    | "HAILO_VSTREAM_PIPELINE_NOT_ACTIVATED"
                    | "HAILO_STREAM_NOT_ACTIVATED"
                    | "HAILO_DEVICE_IN_USE"
                    | "HAILO_QUEUE_IS_FULL"
                    | "HAILO_DRIVER_TIMEOUT"
                    | "HAILO_DRIVER_INTERRUPTED"
                    | "HAILO_DRIVER_WAIT_CANCELED"
                    | "HAILO_OPERATION_ABORTED"
                    | "HAILO_DEVICE_TEMPORARILY_UNAVAILABLE"
            )
        )
    }
}

impl fmt::Display for HailoStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} ({})", self.0),
            None => write!(f, "unknown HailoRT status ({})", self.0),
        }
    }
}

/// Maps the status returned by the HailoRT C function `function`: `HAILO_SUCCESS` is `Ok`,
/// anything else [`InferenceError::Hailo`].
pub fn check(function: &'static str, status: u32) -> Result<(), InferenceError> {
    let status = HailoStatus(status);
    if status == HailoStatus::SUCCESS {
        Ok(())
    } else {
        Err(InferenceError::Hailo { function, status })
    }
}

/// A quantization that cannot be used: HailoRT reports a scale of zero when a tensor has
/// several quantizations, and a non-finite parameter would turn every value into a NaN.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
#[error(
    "invalid quantization: scale {scale}, zero point {zero_point} \
     (the scale must be finite and positive, the zero point finite)"
)]
pub struct InvalidQuantInfo {
    /// The rejected scale.
    pub scale: f32,
    /// The rejected zero point.
    pub zero_point: f32,
}

/// How one tensor's real values map to the integers the NPU computes with (HailoRT's
/// `hailo_quant_info_t`): `q = x / scale + zero_point`, `x = (q - zero_point) * scale`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantInfo {
    /// `qp_scale`: the real value of one integer step.
    pub scale: f32,
    /// `qp_zp`: the integer that stands for the real value 0.
    pub zero_point: f32,
}

impl QuantInfo {
    /// A quantization, checked: the scale finite and greater than zero, the zero point finite.
    pub fn new(scale: f32, zero_point: f32) -> Result<Self, InvalidQuantInfo> {
        if scale.is_finite() && scale > 0.0 && zero_point.is_finite() {
            Ok(QuantInfo { scale, zero_point })
        } else {
            Err(InvalidQuantInfo { scale, zero_point })
        }
    }

    /// `x` in integer steps, rounded half away from zero and clamped to `0..=max`. A NaN
    /// feature becomes the zero point (the real value 0) rather than an arbitrary extreme,
    /// so one bad metric does not push a sample to the edge of the model's input range.
    fn steps(&self, x: f32, max: f32) -> f32 {
        let q = if x.is_nan() {
            self.zero_point
        } else {
            x / self.scale + self.zero_point
        };
        q.round().clamp(0.0, max)
    }

    /// `x` as a uint8 device value: rounded to the nearest step (half away from zero),
    /// saturating at 0 and 255; NaN becomes the zero point.
    pub fn quantize_u8(&self, x: f32) -> u8 {
        // In range after `steps` clamps; `as` also saturates, so nothing can wrap.
        self.steps(x, f32::from(u8::MAX)) as u8
    }

    /// The real value of the uint8 device value `q`.
    pub fn dequantize_u8(&self, q: u8) -> f32 {
        (f32::from(q) - self.zero_point) * self.scale
    }

    /// `x` as a uint16 device value: rounded to the nearest step (half away from zero),
    /// saturating at 0 and 65535; NaN becomes the zero point.
    pub fn quantize_u16(&self, x: f32) -> u16 {
        self.steps(x, f32::from(u16::MAX)) as u16
    }

    /// The real value of the uint16 device value `q`.
    pub fn dequantize_u16(&self, q: u16) -> f32 {
        (f32::from(q) - self.zero_point) * self.scale
    }

    /// Appends `src` quantized to uint8 to `dst`.
    pub fn quantize_into(&self, src: &[f32], dst: &mut Vec<u8>) {
        dst.extend(src.iter().map(|&x| self.quantize_u8(x)));
    }

    /// Appends the real values of the uint8 device values `src` to `dst`.
    pub fn dequantize_into(&self, src: &[u8], dst: &mut Vec<f32>) {
        dst.extend(src.iter().map(|&q| self.dequantize_u8(q)));
    }

    /// Appends `src` quantized to uint16 to `dst`.
    pub fn quantize_u16_into(&self, src: &[f32], dst: &mut Vec<u16>) {
        dst.extend(src.iter().map(|&x| self.quantize_u16(x)));
    }

    /// Appends the real values of the uint16 device values `src` to `dst`.
    pub fn dequantize_u16_into(&self, src: &[u16], dst: &mut Vec<f32>) {
        dst.extend(src.iter().map(|&q| self.dequantize_u16(q)));
    }

    /// Appends `src` as the bytes of `ty` values to `dst`, in host byte order (what HailoRT
    /// reads from a vstream buffer): quantized for the integer types, unchanged for
    /// [`ValueType::F32`] (HailoRT then quantizes itself).
    pub fn encode_into(&self, ty: ValueType, src: &[f32], dst: &mut Vec<u8>) {
        dst.reserve(src.len() * ty.bytes());
        match ty {
            ValueType::U8 => self.quantize_into(src, dst),
            ValueType::U16 => {
                for &x in src {
                    dst.extend_from_slice(&self.quantize_u16(x).to_ne_bytes());
                }
            }
            ValueType::F32 => {
                for &x in src {
                    dst.extend_from_slice(&x.to_ne_bytes());
                }
            }
        }
    }

    /// Appends the real values of `src`, the host-order bytes of `ty` values, to `dst`: the
    /// inverse of [`QuantInfo::encode_into`]. A trailing partial value is ignored; callers
    /// pass whole values (see [`FrameLayout::unpack`]).
    pub fn decode_into(&self, ty: ValueType, src: &[u8], dst: &mut Vec<f32>) {
        dst.reserve(src.len() / ty.bytes());
        match ty {
            ValueType::U8 => self.dequantize_into(src, dst),
            ValueType::U16 => dst.extend(
                src.chunks_exact(2)
                    .map(|b| self.dequantize_u16(u16::from_ne_bytes([b[0], b[1]]))),
            ),
            ValueType::F32 => dst.extend(
                src.chunks_exact(4)
                    .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
            ),
        }
    }
}

/// The type of one value in a vstream buffer on the host side (HailoRT's
/// `hailo_format_type_t` without `AUTO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// uint8, quantized: the usual format of a HEF compiled for the Hailo-8.
    U8,
    /// uint16, quantized: layers compiled with 16-bit precision.
    U16,
    /// float32: HailoRT (de)quantizes on the host.
    F32,
}

impl ValueType {
    /// Bytes per value.
    pub fn bytes(self) -> usize {
        match self {
            ValueType::U8 => 1,
            ValueType::U16 => 2,
            ValueType::F32 => 4,
        }
    }
}

/// Where a sample's values sit in a vstream frame.
///
/// The model takes one sample of `features` values; HailoRT vstreams move whole frames of
/// `frame_size` bytes, one sample per frame. The values come first, in order, and the rest of
/// the frame (if the HEF's frame is larger) is zero padding. The same layout describes an
/// output frame, with `features` the values read per sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLayout {
    /// Values per sample.
    pub features: usize,
    /// Bytes per frame, padding included (HailoRT's vstream frame size).
    pub frame_size: usize,
    /// Bytes per value (1 for uint8, 2 for uint16, 4 for float32).
    pub bytes_per_value: usize,
}

impl FrameLayout {
    /// A layout, checked: at least one value per sample, and the values fit in a frame.
    /// `model` names the model in the error.
    pub fn new(
        model: &str,
        features: usize,
        frame_size: usize,
        bytes_per_value: usize,
    ) -> Result<Self, InferenceError> {
        let layout = FrameLayout {
            features,
            frame_size,
            bytes_per_value,
        };
        layout.row_bytes(model)?;
        Ok(layout)
    }

    /// Bytes of one sample's values, after checking that they fit in a frame (the fields are
    /// public, so every use checks again).
    fn row_bytes(&self, model: &str) -> Result<usize, InferenceError> {
        let shape = |reason: String| InferenceError::Shape {
            model: model.to_owned(),
            reason,
        };
        if self.features == 0 || self.bytes_per_value == 0 {
            return Err(shape(format!(
                "a frame needs at least one value of at least one byte \
                 ({} values, {} bytes each)",
                self.features, self.bytes_per_value
            )));
        }
        match self.features.checked_mul(self.bytes_per_value) {
            Some(bytes) if bytes <= self.frame_size => Ok(bytes),
            _ => Err(shape(format!(
                "{} values ({} bytes each) do not fit in a {}-byte frame",
                self.features, self.bytes_per_value, self.frame_size
            ))),
        }
    }

    /// Appends one frame per sample to `frames`: `values` holds the samples row-major as
    /// encoded bytes (`rows * features * bytes_per_value`, see [`QuantInfo::encode_into`]).
    /// Returns the number of samples. On an error nothing is appended.
    pub fn pack(
        &self,
        model: &str,
        values: &[u8],
        frames: &mut Vec<u8>,
    ) -> Result<usize, InferenceError> {
        let row = self.row_bytes(model)?;
        if !values.len().is_multiple_of(row) {
            return Err(InferenceError::Shape {
                model: model.to_owned(),
                reason: format!(
                    "{} bytes are not whole samples of {} values ({} bytes each)",
                    values.len(),
                    self.features,
                    self.bytes_per_value
                ),
            });
        }
        let rows = values.len() / row;
        let padding = self.frame_size - row;
        frames.reserve(rows * self.frame_size);
        for sample in values.chunks_exact(row) {
            frames.extend_from_slice(sample);
            frames.resize(frames.len() + padding, 0);
        }
        Ok(rows)
    }

    /// Appends the values of each frame in `frames` (whole frames of `frame_size` bytes) to
    /// `values`, dropping the padding: the inverse of [`FrameLayout::pack`]. Returns the
    /// number of frames. On an error nothing is appended.
    pub fn unpack(
        &self,
        model: &str,
        frames: &[u8],
        values: &mut Vec<u8>,
    ) -> Result<usize, InferenceError> {
        let row = self.row_bytes(model)?;
        if !frames.len().is_multiple_of(self.frame_size) {
            return Err(InferenceError::Shape {
                model: model.to_owned(),
                reason: format!(
                    "{} bytes are not whole {}-byte frames",
                    frames.len(),
                    self.frame_size
                ),
            });
        }
        let rows = frames.len() / self.frame_size;
        values.reserve(rows * row);
        for frame in frames.chunks_exact(self.frame_size) {
            values.extend_from_slice(&frame[..row]);
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn q(scale: f32, zero_point: f32) -> QuantInfo {
        QuantInfo::new(scale, zero_point).unwrap()
    }

    #[test]
    fn status_prints_name_and_code() {
        assert_eq!(HailoStatus(0).to_string(), "HAILO_SUCCESS (0)");
        assert_eq!(HailoStatus(4).to_string(), "HAILO_TIMEOUT (4)");
        assert_eq!(HailoStatus(26).to_string(), "HAILO_INVALID_HEF (26)");
        assert_eq!(
            HailoStatus(97).to_string(),
            "HAILO_DEVICE_TEMPORARILY_UNAVAILABLE (97)"
        );
        assert_eq!(HailoStatus(98).name(), None);
        assert_eq!(HailoStatus(98).to_string(), "unknown HailoRT status (98)");
        assert_eq!(
            HailoStatus(u32::MAX).to_string(),
            format!("unknown HailoRT status ({})", u32::MAX)
        );
    }

    #[test]
    fn check_maps_success_to_ok_and_the_rest_to_hailo_errors() {
        assert!(check("hailo_create_vdevice", 0).is_ok());
        let err = check("hailo_vstream_read_raw_buffer", 4).unwrap_err();
        assert!(matches!(
            err,
            InferenceError::Hailo {
                function: "hailo_vstream_read_raw_buffer",
                status: HailoStatus(4),
            }
        ));
        assert_eq!(
            err.to_string(),
            "HailoRT hailo_vstream_read_raw_buffer failed: HAILO_TIMEOUT (4)"
        );
        let err = check("hailo_create_hef_file", 500).unwrap_err();
        assert_eq!(
            err.to_string(),
            "HailoRT hailo_create_hef_file failed: unknown HailoRT status (500)"
        );
    }

    #[test]
    fn transient_statuses_are_the_busy_and_interrupted_ones() {
        for code in [4, 28, 63, 69, 70, 72, 73, 82, 87, 88, 90, 95, 97] {
            assert!(HailoStatus(code).is_transient(), "{}", HailoStatus(code));
        }
        // Success, bad arguments, bad HEFs, driver and internal failures, unknown codes.
        for code in [0, 2, 3, 6, 8, 26, 36, 64, 76, 79, 91, 93, 96, 98, 1000] {
            assert!(!HailoStatus(code).is_transient(), "{}", HailoStatus(code));
        }
    }

    #[test]
    fn invalid_quantizations_are_rejected() {
        for (scale, zero_point) in [
            (0.0, 0.0),
            (-0.5, 0.0),
            (f32::NAN, 0.0),
            (f32::INFINITY, 0.0),
            (0.1, f32::NAN),
            (0.1, f32::NEG_INFINITY),
        ] {
            let err = QuantInfo::new(scale, zero_point).unwrap_err();
            assert!(err.to_string().starts_with("invalid quantization"), "{err}");
        }
        assert_eq!(
            QuantInfo::new(0.5, 3.0),
            Ok(QuantInfo {
                scale: 0.5,
                zero_point: 3.0
            })
        );
    }

    #[test]
    fn quantize_rounds_to_the_nearest_step() {
        let qi = q(0.5, 10.0);
        assert_eq!(qi.quantize_u8(0.0), 10);
        assert_eq!(qi.quantize_u8(1.0), 12);
        assert_eq!(qi.quantize_u8(1.2), 12);
        assert_eq!(qi.quantize_u8(1.3), 13);
        // Exactly half a step: away from zero.
        assert_eq!(qi.quantize_u8(0.25), 11);
        assert_eq!(q(1.0, 0.0).quantize_u8(2.5), 3);
        assert_eq!(qi.dequantize_u8(12), 1.0);
        assert_eq!(qi.dequantize_u8(0), -5.0);
        assert_eq!(qi.quantize_u16(100.0), 210);
        assert_eq!(qi.dequantize_u16(210), 100.0);
    }

    #[test]
    fn quantize_saturates_at_both_ends() {
        let qi = q(0.1, 128.0);
        assert_eq!(qi.quantize_u8(1e9), 255);
        assert_eq!(qi.quantize_u8(f32::INFINITY), 255);
        assert_eq!(qi.quantize_u8(12.75), 255);
        assert_eq!(qi.quantize_u8(-1e9), 0);
        assert_eq!(qi.quantize_u8(f32::NEG_INFINITY), 0);
        assert_eq!(qi.quantize_u8(-12.85), 0);
        assert_eq!(qi.quantize_u16(1e9), u16::MAX);
        assert_eq!(qi.quantize_u16(-1e9), 0);
        assert_eq!(qi.quantize_u16(f32::INFINITY), u16::MAX);
    }

    #[test]
    fn nan_becomes_the_zero_point() {
        assert_eq!(q(0.1, 128.0).quantize_u8(f32::NAN), 128);
        assert_eq!(q(0.1, 12.6).quantize_u8(f32::NAN), 13);
        assert_eq!(q(0.1, 300.0).quantize_u8(f32::NAN), 255);
        assert_eq!(q(0.1, 1000.0).quantize_u16(f32::NAN), 1000);
        assert_eq!(
            q(0.1, 128.0).dequantize_u8(q(0.1, 128.0).quantize_u8(f32::NAN)),
            0.0
        );
    }

    proptest! {
        #[test]
        fn u8_round_trip_is_within_half_a_step(
            scale in 1e-4f32..10.0,
            zero_point in 0u8..=255,
            position in 0.0f32..=1.0,
        ) {
            let qi = q(scale, f32::from(zero_point));
            let lo = qi.dequantize_u8(0);
            let hi = qi.dequantize_u8(255);
            let x = lo + (hi - lo) * position;
            let back = qi.dequantize_u8(qi.quantize_u8(x));
            // Half a step, plus f32 rounding of x / scale + zero_point near 255.
            prop_assert!((back - x).abs() <= scale * 0.501, "{x} -> {back}");
        }

        #[test]
        fn u16_round_trip_is_within_half_a_step(
            scale in 1e-4f32..10.0,
            zero_point in 0u16..=1000,
            position in 0.0f32..=1.0,
        ) {
            let qi = q(scale, f32::from(zero_point));
            let lo = qi.dequantize_u16(0);
            let hi = qi.dequantize_u16(u16::MAX);
            let x = lo + (hi - lo) * position;
            let back = qi.dequantize_u16(qi.quantize_u16(x));
            // Values up to 65535 leave f32 fewer bits below the step than uint8 does.
            prop_assert!((back - x).abs() <= scale * 0.51, "{x} -> {back}");
        }
    }

    #[test]
    fn slice_helpers_append() {
        let qi = q(0.5, 10.0);
        let mut bytes = vec![7];
        qi.quantize_into(&[0.0, 1.0, -100.0, 100.0], &mut bytes);
        assert_eq!(bytes, [7, 10, 12, 0, 210]);
        let mut real = vec![-1.0];
        qi.dequantize_into(&[10, 12], &mut real);
        assert_eq!(real, [-1.0, 0.0, 1.0]);
        let mut wide = Vec::new();
        qi.quantize_u16_into(&[0.0, 1000.0], &mut wide);
        assert_eq!(wide, [10, 2010]);
        let mut real = Vec::new();
        qi.dequantize_u16_into(&wide, &mut real);
        assert_eq!(real, [0.0, 1000.0]);
    }

    #[test]
    fn encode_and_decode_use_host_byte_order() {
        let qi = q(0.5, 10.0);
        let mut bytes = Vec::new();
        qi.encode_into(ValueType::U8, &[1.0, 2.0], &mut bytes);
        assert_eq!(bytes, [12, 14]);

        bytes.clear();
        qi.encode_into(ValueType::U16, &[1000.0, 0.0], &mut bytes);
        let mut expected = 2010u16.to_ne_bytes().to_vec();
        expected.extend_from_slice(&10u16.to_ne_bytes());
        assert_eq!(bytes, expected);
        let mut real = Vec::new();
        qi.decode_into(ValueType::U16, &bytes, &mut real);
        assert_eq!(real, [1000.0, 0.0]);

        // float32 buffers pass through: HailoRT quantizes them itself.
        bytes.clear();
        qi.encode_into(ValueType::F32, &[0.3, -7.25], &mut bytes);
        assert_eq!(bytes.len(), 8);
        let mut real = Vec::new();
        qi.decode_into(ValueType::F32, &bytes, &mut real);
        assert_eq!(real, [0.3, -7.25]);
        assert_eq!(
            [ValueType::U8, ValueType::U16, ValueType::F32].map(ValueType::bytes),
            [1, 2, 4]
        );
    }

    #[test]
    fn pack_pads_each_sample_to_a_frame() {
        let layout = FrameLayout::new("m", 3, 4, 1).unwrap();
        let mut frames = vec![0xAA];
        let rows = layout.pack("m", &[1, 2, 3, 4, 5, 6], &mut frames).unwrap();
        assert_eq!(rows, 2);
        assert_eq!(frames, [0xAA, 1, 2, 3, 0, 4, 5, 6, 0]);

        // Two-byte values: whole values per frame, padding after them.
        let layout = FrameLayout::new("m", 2, 6, 2).unwrap();
        let mut frames = Vec::new();
        let rows = layout
            .pack("m", &[1, 2, 3, 4, 5, 6, 7, 8], &mut frames)
            .unwrap();
        assert_eq!(rows, 2);
        assert_eq!(frames, [1, 2, 3, 4, 0, 0, 5, 6, 7, 8, 0, 0]);

        // No padding, no samples.
        let layout = FrameLayout::new("m", 2, 2, 1).unwrap();
        let mut frames = Vec::new();
        assert_eq!(layout.pack("m", &[9, 8], &mut frames).unwrap(), 1);
        assert_eq!(frames, [9, 8]);
        frames.clear();
        assert_eq!(layout.pack("m", &[], &mut frames).unwrap(), 0);
        assert!(frames.is_empty());
    }

    #[test]
    fn unpack_drops_the_padding() {
        let layout = FrameLayout::new("m", 1, 4, 1).unwrap();
        let mut values = vec![0xAA];
        let rows = layout
            .unpack("m", &[9, 0, 0, 0, 7, 1, 1, 1], &mut values)
            .unwrap();
        assert_eq!(rows, 2);
        assert_eq!(values, [0xAA, 9, 7]);

        let layout = FrameLayout::new("m", 1, 4, 2).unwrap();
        let mut values = Vec::new();
        layout
            .unpack("m", &[1, 2, 0, 0, 3, 4, 0, 0], &mut values)
            .unwrap();
        assert_eq!(values, [1, 2, 3, 4]);

        // pack then unpack is the identity.
        let layout = FrameLayout::new("m", 3, 8, 1).unwrap();
        let mut frames = Vec::new();
        layout.pack("m", &[1, 2, 3, 4, 5, 6], &mut frames).unwrap();
        let mut values = Vec::new();
        assert_eq!(layout.unpack("m", &frames, &mut values).unwrap(), 2);
        assert_eq!(values, [1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn layout_errors_are_shape_errors_naming_the_model() {
        // Frame too small, at construction and when the public fields are changed later.
        let err = FrameLayout::new("anomaly", 5, 4, 1).unwrap_err();
        assert!(matches!(&err, InferenceError::Shape { model, .. } if model == "anomaly"));
        assert_eq!(
            err.to_string(),
            "model \"anomaly\": 5 values (1 bytes each) do not fit in a 4-byte frame"
        );
        assert!(FrameLayout::new("m", 3, 5, 2).is_err());
        assert!(FrameLayout::new("m", 0, 4, 1).is_err());
        assert!(FrameLayout::new("m", 1, 4, 0).is_err());
        assert!(FrameLayout::new("m", usize::MAX, usize::MAX, 2).is_err());
        let mut layout = FrameLayout::new("m", 2, 4, 1).unwrap();
        layout.frame_size = 1;
        let mut out = Vec::new();
        assert!(layout.pack("m", &[1, 2], &mut out).is_err());
        assert!(layout.unpack("m", &[1, 2], &mut out).is_err());
        assert!(out.is_empty());

        // Batch length not whole samples / whole frames: nothing appended.
        let layout = FrameLayout::new("m", 3, 4, 1).unwrap();
        let mut out = vec![1];
        let err = layout.pack("m", &[1, 2, 3, 4], &mut out).unwrap_err();
        assert!(matches!(err, InferenceError::Shape { .. }));
        let err = layout.unpack("m", &[0; 7], &mut out).unwrap_err();
        assert!(matches!(err, InferenceError::Shape { .. }));
        assert_eq!(out, [1]);
        let layout = FrameLayout::new("m", 2, 4, 2).unwrap();
        assert!(layout.pack("m", &[1, 2, 3], &mut out).is_err());
    }
}
