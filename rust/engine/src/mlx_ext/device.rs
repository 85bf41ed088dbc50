//! Which MLX backend this process has, and the device the engine computes on.

use anyhow::{bail, Result};
use mlx_rs::Device;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Gpu,
}

impl std::str::FromStr for DeviceKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "gpu" => Ok(Self::Gpu),
            other => bail!("unknown device {other:?}: use gpu or cpu"),
        }
    }
}

/// "metal", "cuda" or "cpu": the GPU backend of the loaded libmlx, if any.
pub fn backend() -> &'static str {
    let mut metal = false;
    let mut cuda = false;
    unsafe {
        mlx_sys::mlx_metal_is_available(&mut metal);
        mlx_sys::mlx_cuda_is_available(&mut cuda);
    }
    if metal {
        "metal"
    } else if cuda {
        "cuda"
    } else {
        "cpu"
    }
}

pub fn gpu_available() -> bool {
    backend() != "cpu"
}

impl DeviceKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Gpu => "gpu",
        }
    }
}

/// The device the engine runs on for a request of `requested`: the GPU when asked for (an error
/// if this MLX has none) or, unasked, whenever MLX has one.
pub fn resolve(requested: Option<DeviceKind>) -> Result<DeviceKind> {
    Ok(match requested {
        Some(DeviceKind::Gpu) if !gpu_available() => {
            bail!("device gpu requested but this MLX build has no GPU backend (install mlx-metal or mlx-cuda-13, or use cpu)")
        }
        Some(k) => k,
        None if gpu_available() => DeviceKind::Gpu,
        None => DeviceKind::Cpu,
    })
}

/// Make `requested` (or the best available device) MLX's default device for this process.
pub fn select(requested: Option<DeviceKind>) -> Result<DeviceKind> {
    let kind = resolve(requested)?;
    Device::set_default(&match kind {
        DeviceKind::Cpu => Device::cpu(),
        DeviceKind::Gpu => Device::gpu(),
    });
    Ok(kind)
}

/// Bytes of memory behind `kind`: the GPU's as MLX reports it, else physical RAM (the CPU's
/// memory, and what Metal GPUs share with the CPU when MLX reports no size).
pub fn total_memory(kind: DeviceKind) -> usize {
    let reported = match kind {
        DeviceKind::Gpu => memory_size(),
        DeviceKind::Cpu => 0,
    };
    if reported > 0 {
        reported
    } else {
        physical_memory()
    }
}

fn physical_memory() -> usize {
    // SAFETY: sysconf only reads system configuration.
    let (pages, page_size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    if pages <= 0 || page_size <= 0 {
        return 0;
    }
    pages as usize * page_size as usize
}

/// Device memory in bytes as MLX reports it (0 when it does not).
pub fn memory_size() -> usize {
    let kind = if gpu_available() {
        mlx_sys::mlx_device_type__MLX_GPU
    } else {
        mlx_sys::mlx_device_type__MLX_CPU
    };
    unsafe {
        let dev = mlx_sys::mlx_device_new_type(kind, 0);
        let mut info = mlx_sys::mlx_device_info_new();
        let status = mlx_sys::mlx_device_info_get(&mut info, dev);
        mlx_sys::mlx_device_free(dev);
        if status != 0 {
            mlx_sys::mlx_device_info_free(info);
            return 0;
        }
        let key = c"memory_size";
        let mut has = false;
        let mut size: usize = 0;
        if mlx_sys::mlx_device_info_has_key(&mut has, info, key.as_ptr()) == 0 && has {
            mlx_sys::mlx_device_info_get_size(&mut size, info, key.as_ptr());
        }
        mlx_sys::mlx_device_info_free(info);
        size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_memory_is_physical_ram() {
        let ram = physical_memory();
        assert!(ram > 256 << 20, "physical memory {ram}");
        assert_eq!(total_memory(DeviceKind::Cpu), ram);
        assert_eq!(resolve(Some(DeviceKind::Cpu)).unwrap(), DeviceKind::Cpu);
        assert_eq!(resolve(None).unwrap() == DeviceKind::Gpu, gpu_available());
    }
}
