//! OpenSSH's escape sequences (`~.`, `~?`, `~~`) on a multiplexing
//! client's tty input, which ssh leaves to its ControlMaster.

use std::os::fd::OwnedFd;

use bytes::Bytes;

/// What the escape filter made of some input.
pub enum Filtered {
    /// Bytes to send on (possibly none).
    Data(Bytes),
    /// `~.`: disconnect.
    Disconnect,
}

/// OpenSSH's escape sequences at the start of a line: `~.` disconnects,
/// `~?` lists the escapes, `~~` sends one `~`; the rest are passed on.
pub struct Escape {
    /// The escape character (`~` unless the client set another).
    ch: u8,
    /// The last byte was a newline (or nothing was typed yet).
    at_line_start: bool,
    /// The escape character was typed at a line start.
    pending: bool,
    /// The client's stderr, for the `~?` help.
    help: Option<OwnedFd>,
}

impl Escape {
    /// A filter for escape character `ch`.
    pub fn new(ch: u8, help: Option<OwnedFd>) -> Self {
        Escape {
            ch,
            at_line_start: true,
            pending: false,
            help,
        }
    }

    /// Filters one chunk of typed input.
    pub fn filter(&mut self, input: &[u8]) -> Filtered {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.pending {
                self.pending = false;
                match b {
                    b'.' => return Filtered::Disconnect,
                    b'?' => self.help(),
                    c if c == self.ch => out.push(c),
                    c => {
                        out.push(self.ch);
                        out.push(c);
                    }
                }
                self.at_line_start = false;
                continue;
            }
            if self.at_line_start && b == self.ch {
                self.pending = true;
                continue;
            }
            out.push(b);
            self.at_line_start = b == b'\r' || b == b'\n';
        }
        Filtered::Data(Bytes::from(out))
    }

    /// Writes the list of supported escapes to the client's terminal.
    fn help(&self) {
        let Some(fd) = &self.help else { return };
        let c = self.ch as char;
        let text = format!(
            "\r\nSupported escape sequences (sshshim multiplexing master):\r\n \
             {c}.   - terminate session\r\n \
             {c}?   - this message\r\n \
             {c}{c}   - send the escape character by typing it twice\r\n\
             (Note that escapes are only recognized immediately after newline.)\r\n"
        );
        if let Ok(dup) = fd.try_clone() {
            let mut f = std::fs::File::from(dup);
            let _ = std::io::Write::write_all(&mut f, text.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs one chunk through the filter: the bytes sent on, `None` for a
    /// disconnect.
    fn run(esc: &mut Escape, s: &[u8]) -> Option<Vec<u8>> {
        match esc.filter(s) {
            Filtered::Data(d) => Some(d.to_vec()),
            Filtered::Disconnect => None,
        }
    }

    #[test]
    fn escapes_only_at_line_start() {
        let mut e = Escape::new(b'~', None);
        assert_eq!(run(&mut e, b"a~b\r"), Some(b"a~b\r".to_vec()));
        assert_eq!(run(&mut e, b"~~x"), Some(b"~x".to_vec()));
        assert_eq!(run(&mut e, b"\r~q"), Some(b"\r~q".to_vec()));
        assert_eq!(run(&mut e, b"\n~"), Some(b"\n".to_vec()));
        // The pending escape carries over to the next chunk.
        assert_eq!(run(&mut e, b"."), None);
        let mut e = Escape::new(b'~', None);
        assert_eq!(run(&mut e, b"~?"), Some(Vec::new()));
        assert_eq!(run(&mut e, b"ls\r~.rest"), None);
    }
}
