//! Finding what a VM is made of: the guest kernel, the initramfs with
//! guest-init, QEMU and virtiofsd. `hack/setup` installs them where this
//! looks, so the runtime needs no flags.

use std::path::{Path, PathBuf};

/// Overrides the directory holding vmlinux, initramfs.cpio and virtiofsd.
pub const LIBDIR_ENV: &str = "KRUN_OCI_LIBDIR";

#[derive(Debug, Clone)]
pub struct Assets {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    dirs: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("no guest kernel (vmlinux) or initramfs found in {searched}; run hack/setup to build and install them")]
    NoGuest { searched: String },
    #[error("{program} not found in {searched}; run hack/setup to install it")]
    NoProgram {
        program: &'static str,
        searched: String,
    },
}

fn libdirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os(LIBDIR_ENV) {
        dirs.push(PathBuf::from(d));
    }
    if let Some(exe_dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        dirs.push(exe_dir.join("../lib/krun-oci"));
    }
    dirs.push(PathBuf::from("/usr/local/lib/krun-oci"));
    dirs.push(PathBuf::from("/usr/lib/krun-oci"));
    dirs
}

fn find_program(name: &'static str, extra: &[PathBuf]) -> Result<PathBuf, AssetError> {
    let path_dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    let dirs: Vec<PathBuf> = extra
        .iter()
        .cloned()
        .chain(path_dirs)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/libexec")])
        .collect();
    dirs.iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| AssetError::NoProgram {
            program: name,
            searched: join(&dirs),
        })
}

fn join(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Assets {
    /// Finds the guest kernel and initramfs.
    pub fn find() -> Result<Assets, AssetError> {
        let dirs = libdirs();
        let dir = dirs
            .iter()
            .find(|d| d.join("vmlinux").is_file() && d.join("initramfs.cpio").is_file())
            .ok_or_else(|| AssetError::NoGuest {
                searched: join(&dirs),
            })?;
        Ok(Assets {
            kernel: dir.join("vmlinux"),
            initrd: dir.join("initramfs.cpio"),
            dirs,
        })
    }

    /// QEMU, for the QEMU backend.
    pub fn qemu(&self) -> Result<PathBuf, AssetError> {
        find_program("qemu-system-x86_64", &[])
    }

    /// virtiofsd, for the QEMU backend.
    pub fn virtiofsd(&self) -> Result<PathBuf, AssetError> {
        find_program("virtiofsd", &self.dirs)
    }
}
