//! The NPU, when there is one: opened once at start-up and shared by every worker's scorer.

use std::sync::Arc;

use primespark_operators::inference::{Backend, BackendChoice, InferenceError};

/// Makes one worker's handle on the NPU: every worker shares the device opened at start-up
/// (HailoRT gives a virtual device to one opener at a time).
pub type PrimaryFactory = Arc<dyn Fn() -> Box<dyn Backend> + Send + Sync>;

/// Opens the NPU if `choice` asks for it (and `auto` finds one): `None` means CPU only.
pub fn primary_backend(choice: BackendChoice) -> Result<Option<PrimaryFactory>, InferenceError> {
    match choice {
        BackendChoice::Cpu => Ok(None),
        BackendChoice::Hailo => Ok(Some(open_hailo()?)),
        BackendChoice::Auto => match open_hailo() {
            Ok(h) => Ok(Some(h)),
            Err(e) => {
                tracing::info!(reason = %e, "no Hailo-8 in use; inference runs on the CPU");
                Ok(None)
            }
        },
    }
}

#[cfg(feature = "hailo")]
fn open_hailo() -> Result<PrimaryFactory, InferenceError> {
    use primespark_hailo::HailoBackend;
    if !HailoBackend::device_present() {
        return Err(InferenceError::NoDevice("no Hailo device found".into()));
    }
    let device = std::sync::Mutex::new(HailoBackend::open()?);
    Ok(Arc::new(move || {
        let backend = match device.lock() {
            Ok(d) => d.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        Box::new(backend) as Box<dyn Backend>
    }))
}

#[cfg(not(feature = "hailo"))]
fn open_hailo() -> Result<PrimaryFactory, InferenceError> {
    let present = std::path::Path::new("/dev/hailo0").exists();
    Err(InferenceError::NoDevice(if present {
        "/dev/hailo0 exists but this build has no Hailo support (build with --features hailo)"
            .into()
    } else {
        "this build has no Hailo support (build with --features hailo)".into()
    }))
}
