//! What this machine offers, compared with what an image needs: the kernel's vDSO layout,
//! the CPU's features, the files the program had mapped or open.

use limitless_image::cpu;
use limitless_image::file::Image;
use limitless_image::format::{vdso_kind, vma_kind, VdsoInfo};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Why an image cannot be restored on this machine.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The kernel's vDSO differs.
    #[error("the image was made on a kernel with another vDSO layout ({0}); restore it on the same kernel build")]
    Vdso(String),
    /// The CPU lacks a feature.
    #[error("this CPU lacks the `{0}` feature the checkpointed program uses; restore it on a CPU that has it")]
    Cpu(&'static str),
    /// The CPU's XSAVE components differ.
    #[error("this CPU's XSAVE state (XCR0 {here:#x}) lacks components the image uses (XCR0 {image:#x})")]
    Xsave {
        /// XCR0 here.
        here: u64,
        /// XCR0 in the image.
        image: u64,
    },
    /// A file the program mapped changed or is missing.
    #[error("{path} {what}; the restore needs the same file as at the checkpoint")]
    File {
        /// The file.
        path: String,
        /// What is wrong with it.
        what: String,
    },
}

/// This process's vDSO block and the hash of its code.
pub fn vdso() -> VdsoInfo {
    let mut v = VdsoInfo::zeroed();
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else { return v };
    for line in maps.lines() {
        let name = line.split_whitespace().nth(5).unwrap_or("");
        let k = match name {
            "[vvar]" => vdso_kind::VVAR,
            "[vvar_vclock]" => vdso_kind::VVAR_VCLOCK,
            "[vdso]" => vdso_kind::VDSO,
            _ => continue,
        };
        let range = line.split_whitespace().next().unwrap_or("");
        let mut it = range.split('-').map(|x| u64::from_str_radix(x, 16).unwrap_or(0));
        let (s, e) = (it.next().unwrap_or(0), it.next().unwrap_or(0));
        if (v.count as usize) < v.areas.len() {
            v.areas[v.count as usize] = limitless_image::format::VdsoArea { kind: k, reserved: 0, start: s, len: e - s };
            v.count += 1;
        }
        if k == vdso_kind::VDSO && e > s {
            // SAFETY: the vDSO is mapped readable in this process at [s, e) for its whole life.
            let code = unsafe { std::slice::from_raw_parts(s as *const u8, (e - s) as usize) };
            v.vdso_hash = limitless_image::format::fnv1a(code);
        }
    }
    v
}

fn layout(v: &VdsoInfo) -> String {
    v.areas[..v.count as usize]
        .iter()
        .map(|a| {
            let n = match a.kind {
                vdso_kind::VVAR => "vvar",
                vdso_kind::VVAR_VCLOCK => "vvar_vclock",
                vdso_kind::VDSO => "vdso",
                _ => "?",
            };
            format!("{n} {} KiB at +{:#x}", a.len / 1024, a.start - v.areas[0].start)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks the vDSO layout: same areas, same sizes and relative positions, same code.
pub fn check_vdso(image: &VdsoInfo) -> Result<(), HostError> {
    let here = vdso();
    let same_shape = here.count == image.count
        && (0..here.count as usize).all(|i| {
            let (a, b) = (&here.areas[i], &image.areas[i]);
            a.kind == b.kind && a.len == b.len && a.start - here.areas[0].start == b.start - image.areas[0].start
        });
    if !same_shape {
        return Err(HostError::Vdso(format!("image: {}; here: {}", layout(image), layout(&here))));
    }
    if here.vdso_hash != image.vdso_hash {
        return Err(HostError::Vdso("the vDSO code differs".into()));
    }
    Ok(())
}

/// Checks CPU features and XSAVE components.
pub fn check_cpu(image: &limitless_image::format::CpuInfo) -> Result<(), HostError> {
    let here = cpu::current();
    if let Some(f) = cpu::first_missing(image, &here) {
        return Err(HostError::Cpu(f.name));
    }
    if image.xcr0 & !here.xcr0 != 0 {
        return Err(HostError::Xsave { here: here.xcr0, image: image.xcr0 });
    }
    Ok(())
}

/// Checks that every file the program had mapped is still the same (size and modification
/// time). `fix` may put a missing file back (the agent library) and returns whether it did.
pub fn check_files(img: &Image, mut fix: impl FnMut(&Path) -> bool) -> Result<(), HostError> {
    for v in &img.vmas {
        if v.info.kind != vma_kind::FILE_PRIVATE && v.info.kind != vma_kind::FILE_SHARED {
            continue;
        }
        let path = Image::vma_name(v);
        let p = Path::new(&path);
        let md = match std::fs::metadata(p) {
            Ok(m) => m,
            Err(_) if fix(p) => {
                std::fs::metadata(p).map_err(|e| HostError::File { path: path.clone(), what: format!("cannot be read ({e})") })?
            }
            Err(e) => return Err(HostError::File { path, what: format!("is missing ({e})") }),
        };
        if !md.is_file() {
            return Err(HostError::File { path, what: "is no longer a regular file".into() });
        }
        if md.len() != v.info.file_size {
            return Err(HostError::File { path, what: format!("changed size ({} bytes, was {})", md.len(), v.info.file_size) });
        }
        if md.mtime() != v.info.mtime_sec || md.mtime_nsec() as u32 != v.info.mtime_nsec {
            return Err(HostError::File { path, what: "was modified since the checkpoint".into() });
        }
    }
    for (path, id) in &img.build_ids {
        let p = Path::new(std::ffi::OsStr::from_bytes(path));
        let now = super::elf::build_id(p);
        if now.as_deref() != Some(id.as_slice()) {
            return Err(HostError::File {
                path: p.display().to_string(),
                what: format!(
                    "is another build (ELF build-id {}; the checkpoint was taken with {})",
                    now.map_or("none".into(), |n| super::elf::hex(&n)),
                    super::elf::hex(id)
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_vdso_matches_itself_and_not_a_moved_copy() {
        let v = vdso();
        assert!(v.count >= 1, "this kernel maps a vDSO");
        assert!(check_vdso(&v).is_ok());
        let mut other = v;
        other.areas[0].len += 4096;
        assert!(matches!(check_vdso(&other), Err(HostError::Vdso(_))));
        let mut moved = v;
        for a in &mut moved.areas[..moved.count as usize] {
            a.start += 1 << 30;
        }
        assert!(check_vdso(&moved).is_ok(), "the block may move as a whole");
    }
}
