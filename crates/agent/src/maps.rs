//! `/proc/self/maps`, read once into scratch memory and parsed without allocation, and the
//! fork-related `VmFlags` of each area from `/proc/self/smaps`.

use crate::scratch::Scratch;
use limitless_image::format::vflags;
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
    /// `vflags` (`MADV_DONTFORK`, `MADV_WIPEONFORK`) from `/proc/self/smaps`.
    pub flags: u32,
    /// Registered for userfaultfd write-protection (`uw` in `VmFlags`).
    pub uffd_wp: bool,
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

/// Room for a path and its NUL ([`c_path`]).
pub const PATH_BUF: usize = 4097;

/// `name` (a path from the map, or any path) NUL-terminated in `buf`, if it fits.
pub fn c_path<'a>(name: &[u8], buf: &'a mut [u8; PATH_BUF]) -> Option<&'a [u8]> {
    let n = name.len();
    if n >= buf.len() {
        return None;
    }
    buf[..n].copy_from_slice(name);
    buf[n] = 0;
    Some(&buf[..n + 1])
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
        flags: 0,
        uffd_wp: false,
        name_off: name_start as u32,
        name_len: (w - name_start) as u32,
    })
}

/// Reads the `VmFlags` lines of `/proc/self/smaps` into `maps` (`dc` is `MADV_DONTFORK`,
/// `wf` is `MADV_WIPEONFORK`, `uw` userfaultfd write-protection), streaming through a fixed buffer. Areas are matched by their
/// start address; the map must be the one just read (the program is frozen and the agent
/// maps nothing in between).
pub fn read_vmflags(s: &mut Scratch, maps: &mut Maps) -> sys::Result<()> {
    let buf = s.array::<u8>(256 << 10).ok_or(sys::Errno::ENOMEM)?;
    let fd = sys::openat(sys::AT_FDCWD, b"/proc/self/smaps\0", sys::O_RDONLY | sys::O_CLOEXEC, 0)?;
    let mut p = SmapsParser { next: 0, cur: None };
    let mut len = 0;
    let r = loop {
        match sys::read(fd, &mut buf[len..]) {
            Ok(0) => {
                p.line(maps, &buf[..len]);
                break Ok(());
            }
            Ok(n) => {
                len += n;
                let mut pos = 0;
                while let Some(i) = buf[pos..len].iter().position(|&b| b == b'\n') {
                    p.line(maps, &buf[pos..pos + i]);
                    pos += i + 1;
                }
                if pos == 0 && len == buf.len() {
                    // A line longer than the buffer (a long name): its start was seen.
                    p.line(maps, &buf[..len]);
                    len = 0;
                } else {
                    buf.copy_within(pos..len, 0);
                    len -= pos;
                }
            }
            Err(sys::Errno::EINTR) => {}
            Err(e) => break Err(e),
        }
    };
    let _ = sys::close(fd);
    r
}

struct SmapsParser {
    /// The next map entry to match.
    next: usize,
    /// The map entry the lines belong to now.
    cur: Option<usize>,
}

impl SmapsParser {
    fn line(&mut self, maps: &mut Maps, line: &[u8]) {
        if let Some(rest) = line.strip_prefix(b"VmFlags:") {
            if let Some(i) = self.cur {
                for f in rest.split(|&b| b == b' ') {
                    match f {
                        b"dc" => maps.entries[i].flags |= vflags::DONTFORK,
                        b"wf" => maps.entries[i].flags |= vflags::WIPEONFORK,
                        b"uw" => maps.entries[i].uffd_wp = true,
                        _ => {}
                    }
                }
            }
            return;
        }
        // An area's first line starts with its lower-case hex start address and a '-'.
        if !line.first().is_some_and(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c)) {
            return;
        }
        let Some((start, k)) = sys::parse_hex(line) else { return };
        if line.get(k) != Some(&b'-') {
            return;
        }
        self.cur = None;
        while self.next < maps.n && maps.entries[self.next].start < start {
            self.next += 1;
        }
        if self.next < maps.n && maps.entries[self.next].start == start {
            self.cur = Some(self.next);
            self.next += 1;
        }
    }
}
