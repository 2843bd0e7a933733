//! Byte ranges of the top-level `plugins` array and its elements, so that the
//! conflist can be edited in place. The text has already been parsed as JSON,
//! so this scanner only has to find boundaries, not validate.

use std::ops::Range;

/// Where the `plugins` array and each of its elements sit in the text.
#[derive(Debug)]
pub(super) struct Layout {
    /// Byte offset of the array's `[`.
    pub(super) open: usize,
    /// Byte range of each element.
    pub(super) elements: Vec<Range<usize>>,
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// The end of the string starting at `i` (which is a `"`).
fn skip_string(b: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// The end of the value starting at `i`.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match *b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                j += 1;
            }
            Some(j)
        }
    }
}

/// Finds the top-level `plugins` array and its elements' byte ranges.
pub(super) fn scan(text: &str) -> Option<Layout> {
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    let mut found: Option<Layout> = None;
    loop {
        i = skip_ws(b, i);
        match b.get(i)? {
            b'}' => return found,
            b',' => {
                i += 1;
                continue;
            }
            b'"' => {}
            _ => return None,
        }
        let key_end = skip_string(b, i)?;
        let key: String = serde_json::from_str(&text[i..key_end]).ok()?;
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, i + 1);
        let value_end = skip_value(b, i)?;
        if key == "plugins" && b[i] == b'[' {
            if found.is_some() {
                // A duplicate key: refuse rather than guess which one a runtime reads.
                return None;
            }
            found = Some(scan_array(b, i)?);
        }
        i = value_end;
    }
}

fn scan_array(b: &[u8], open: usize) -> Option<Layout> {
    let mut elements = Vec::new();
    let mut i = open + 1;
    loop {
        i = skip_ws(b, i);
        match b.get(i)? {
            b']' => return Some(Layout { open, elements }),
            b',' => {
                i += 1;
                continue;
            }
            _ => {}
        }
        let end = skip_value(b, i)?;
        elements.push(i..end);
        i = end;
    }
}
