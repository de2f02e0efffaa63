//! The remote helper: what `sshshim remote-helper` does on the server.
