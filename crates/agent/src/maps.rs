//! `/proc/self/maps`, read once into scratch memory and parsed without allocation.

use crate::scratch::Scratch;
use limitless_sys as sys;

/// One line of the memory map.
#[derive(Clone, Copy, Default)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub pgoff: u64,
    pub dev: u64,
    pub ino: u64,
    pub prot: u32,
    pub shared: bool,
    /// Name: offset and length into the text buffer (unescaped in place).
    pub name_off: u32,
    pub name_len: u32,
}

/// The parsed map.
pub struct Maps {
    pub text: &'static mut [u8],
    pub entries: &'static mut [MapEntry],
    pub n: usize,
}

impl Maps {
    /// The name of entry `e`.
    pub fn name(&self, e: &MapEntry) -> &[u8] {
        &self.text[e.name_off as usize..(e.name_off + e.name_len) as usize]
    }
}

/// Linux `makedev` as `st_dev` encodes it.
pub fn makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xffff_f000) << 32) | ((major & 0xfff) << 8) | ((minor & 0xffff_ff00) << 12) | (minor & 0xff)
}

/// Reads and parses `/proc/self/maps`. `cap` bounds the text size.
pub fn read(s: &mut Scratch, cap: usize) -> sys::Result<Maps> {
    let text = s.array::<u8>(cap).ok_or(sys::Errno::ENOMEM)?;
    let fd = sys::openat(sys::AT_FDCWD, b"/proc/self/maps\0", sys::O_RDONLY | sys::O_CLOEXEC, 0)?;
    let mut len = 0;
    let r = loop {
        match sys::read(fd, &mut text[len..]) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                len += n;
                if len == text.len() {
                    break Err(sys::Errno::ENOMEM);
                }
            }
            Err(sys::Errno::EINTR) => {}
            Err(e) => break Err(e),
        }
    };
    let _ = sys::close(fd);
    r?;
    let lines = text[..len].iter().filter(|&&b| b == b'\n').count();
    let entries = s.array::<MapEntry>(lines + 1).ok_or(sys::Errno::ENOMEM)?;
    let mut n = 0;
    let mut pos = 0;
    while pos < len {
        let eol = text[pos..len].iter().position(|&b| b == b'\n').map_or(len, |i| pos + i);
        if let Some(e) = parse_line(text, pos, eol) {
            entries[n] = e;
            n += 1;
        }
        pos = eol + 1;
    }
    Ok(Maps { text, entries, n })
}

/// Parses `start-end perms offset maj:min inode   name` in `text[pos..eol]`, unescaping the
/// name in place (`\012` is a newline in a file name).
fn parse_line(text: &mut [u8], pos: usize, eol: usize) -> Option<MapEntry> {
    let line = &text[pos..eol];
    let (start, a) = sys::parse_hex(line)?;
    let (end, b) = sys::parse_hex(line.get(a + 1..)?)?;
    let mut i = a + 1 + b + 1;
    let perms = line.get(i..i + 4)?;
    let mut prot = 0;
    if perms[0] == b'r' {
        prot |= 1;
    }
    if perms[1] == b'w' {
        prot |= 2;
    }
    if perms[2] == b'x' {
        prot |= 4;
    }
    let shared = perms[3] == b's';
    i += 5;
    let (pgoff, c) = sys::parse_hex(line.get(i..)?)?;
    i += c + 1;
    let (major, d) = sys::parse_hex(line.get(i..)?)?;
    i += d + 1;
    let (minor, e) = sys::parse_hex(line.get(i..)?)?;
    i += e + 1;
    let (ino, f) = sys::parse_u64(line.get(i..)?)?;
    i += f;
    while i < line.len() && line[i] == b' ' {
        i += 1;
    }
    // Unescape "\012" in place.
    let name_start = pos + i;
    let mut w = name_start;
    let mut r = name_start;
    while r < eol {
        if text[r] == b'\\' && r + 3 < eol && &text[r + 1..r + 4] == b"012" {
            text[w] = b'\n';
            r += 4;
        } else {
            text[w] = text[r];
            r += 1;
        }
        w += 1;
    }
    Some(MapEntry {
        start,
        end,
        pgoff,
        dev: makedev(major, minor),
        ino,
        prot,
        shared,
        name_off: name_start as u32,
        name_len: (w - name_start) as u32,
    })
}
