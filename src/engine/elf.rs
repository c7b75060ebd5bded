//! ELF build-ids: the GNU build-id note of an executable or library, which names its exact
//! build. An image records the build-id of each executable file the program had mapped, and
//! a restore refuses a file with another one (size and modification time are checked too,
//! but a different build of the same size copied with its time kept would pass them).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Longest build-id kept (GNU ld writes 20 bytes; 64 leaves room for others).
pub const MAX_ID: usize = 64;

/// Segment type of a loaded segment.
pub const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// Segment flag: writable.
pub const PF_W: u32 = 2;
const NT_GNU_BUILD_ID: u32 = 3;

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// One program header of an ELF file.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    /// The segment's type, as [`PT_LOAD`].
    pub kind: u32,
    /// Its flags, as [`PF_W`].
    pub flags: u32,
    /// Where it starts in the file.
    pub offset: u64,
    /// Its bytes in the file.
    pub file_size: u64,
}

/// The program headers of the 64-bit little-endian ELF file `f`; `None` when it is not one
/// (or has none, or more than 256) or they cannot be read.
pub fn segments(f: &File) -> Option<Vec<Segment>> {
    let mut eh = [0u8; 64];
    f.read_exact_at(&mut eh, 0).ok()?;
    // Magic, 64-bit, little-endian.
    if eh[..4] != *b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return None;
    }
    let (phoff, phentsize, phnum) = (u64_at(&eh, 32)?, u16_at(&eh, 54)? as usize, u16_at(&eh, 56)? as usize);
    if phentsize < 56 || phnum == 0 || phnum > 256 {
        return None;
    }
    let mut ph = vec![0u8; phentsize * phnum];
    f.read_exact_at(&mut ph, phoff).ok()?;
    ph.chunks_exact(phentsize)
        .map(|e| Some(Segment { kind: u32_at(e, 0)?, flags: u32_at(e, 4)?, offset: u64_at(e, 8)?, file_size: u64_at(e, 32)? }))
        .collect()
}

/// The GNU build-id of the 64-bit little-endian ELF file at `path`; `None` when it is not
/// one or has none (or cannot be read). Reads at most a few pages; every offset is checked.
pub fn build_id(path: &Path) -> Option<Vec<u8>> {
    let f = File::open(path).ok()?;
    for e in segments(&f)? {
        if e.kind != PT_NOTE {
            continue;
        }
        let (off, size) = (e.offset, e.file_size);
        if size > 1 << 16 {
            continue;
        }
        let mut notes = vec![0u8; size as usize];
        if f.read_exact_at(&mut notes, off).is_err() {
            continue;
        }
        // Notes: namesz, descsz, type, then name and desc, each padded to 4 bytes.
        let mut o = 0;
        while o + 12 <= notes.len() {
            let (namesz, descsz, kind) = (u32_at(&notes, o)? as usize, u32_at(&notes, o + 4)? as usize, u32_at(&notes, o + 8)?);
            let name_at = o + 12;
            let desc_at = name_at.checked_add(namesz.checked_add(3)? & !3)?;
            let end = desc_at.checked_add(descsz.checked_add(3)? & !3)?;
            if desc_at + descsz > notes.len() {
                break;
            }
            if kind == NT_GNU_BUILD_ID && notes.get(name_at..name_at + namesz) == Some(b"GNU\0") && (1..=MAX_ID).contains(&descsz) {
                return Some(notes[desc_at..desc_at + descsz].to_vec());
            }
            o = end;
        }
    }
    None
}

/// Hex of `b`, for messages.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_build_id_of_a_program_and_none_in_other_files() {
        // Debian's gcc links with --build-id: /bin/true has one, 20 bytes (SHA-1).
        let id = build_id(Path::new("/bin/true")).expect("/bin/true has a GNU build-id");
        assert_eq!(id.len(), 20);
        assert_eq!(build_id(Path::new("/bin/true")), Some(id));
        assert_eq!(build_id(Path::new("/etc/passwd")), None);
        assert_eq!(build_id(Path::new("/nonexistent")), None);
        // Its program headers: text and data are loaded, the data writable.
        let segs = segments(&File::open("/bin/true").unwrap()).expect("/bin/true has program headers");
        assert!(segs.iter().any(|s| s.kind == PT_LOAD && s.flags & PF_W != 0), "{segs:?}");
        assert!(segments(&File::open("/etc/passwd").unwrap()).is_none());
    }
}
