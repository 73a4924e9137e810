//! HPACK (RFC 7541), as much as one gRPC call needs: the request's headers are written as
//! literals without indexing and without Huffman coding (always valid, nothing for the agent to
//! remember), and the agent's answer is decoded in full — indexed fields, both tables, size
//! updates, Huffman strings — because its encoder (h2's) uses all of them.
//!
//! Written here rather than taken from a crate: the maintained HPACK implementation (h2's) is
//! private to h2, and the public ones are unmaintained or pull in an async stack; see
//! `agent.rs` for why the plugin has none.

use std::collections::VecDeque;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HpackError {
    #[error("header block ends inside a field")]
    Truncated,
    #[error("integer too large")]
    Overflow,
    #[error("index {0} is in neither table")]
    BadIndex(usize),
    #[error("invalid Huffman string")]
    Huffman,
    #[error("dynamic table size {0} is over the {MAX_TABLE_SIZE} this side allows")]
    TableSize(usize),
    #[error("decoded header list is over {MAX_LIST} bytes")]
    TooLarge,
}

/// A header field: name and value, as bytes.
pub type Field = (Vec<u8>, Vec<u8>);

/// The dynamic table size this side allows (SETTINGS_HEADER_TABLE_SIZE's default, never
/// changed by the plugin).
pub const MAX_TABLE_SIZE: usize = 4096;

/// The most decoded header bytes one block may carry (the agent's are a few hundred).
pub const MAX_LIST: usize = 64 * 1024;

/// RFC 7541 Appendix A.
const STATIC: [(&str, &str); 61] = [
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
];

/// RFC 7541 Appendix B: the code length in bits of each symbol (256 is EOS). The code is
/// canonical (codes of one length are consecutive, in symbol order, and shorter codes come
/// first), so the lengths determine every code; [`tree`] rebuilds them.
const CODE_LENGTHS: [u8; 257] = [
    13, 23, 28, 28, 28, 28, 28, 28, 28, 24, 30, 28, 28, 30, 28, 28, // 0..
    28, 28, 28, 28, 28, 28, 30, 28, 28, 28, 28, 28, 28, 28, 28, 28, // 16..
    6, 10, 10, 12, 13, 6, 8, 11, 10, 10, 8, 11, 8, 6, 6, 6, // 32..
    5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 7, 8, 15, 6, 12, 10, // 48..
    13, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, // 64..
    7, 7, 7, 7, 7, 7, 7, 7, 8, 7, 8, 13, 19, 13, 14, 6, // 80..
    15, 5, 6, 5, 6, 5, 6, 6, 6, 5, 7, 7, 6, 6, 6, 5, // 96..
    6, 7, 6, 5, 5, 6, 7, 7, 7, 7, 7, 15, 11, 14, 13, 28, // 112..
    20, 22, 20, 20, 22, 22, 22, 23, 22, 23, 23, 23, 23, 23, 24, 23, // 128..
    24, 24, 22, 23, 24, 23, 23, 23, 23, 21, 22, 23, 22, 23, 23, 24, // 144..
    22, 21, 20, 22, 22, 23, 23, 21, 23, 22, 22, 24, 21, 22, 23, 23, // 160..
    21, 21, 22, 21, 23, 22, 23, 23, 20, 22, 22, 22, 23, 22, 22, 23, // 176..
    26, 26, 20, 19, 22, 23, 22, 25, 26, 26, 26, 27, 27, 26, 24, 25, // 192..
    19, 21, 26, 27, 27, 26, 27, 24, 21, 21, 26, 26, 28, 27, 27, 27, // 208..
    20, 24, 20, 21, 22, 21, 21, 23, 22, 22, 25, 25, 24, 24, 26, 23, // 224..
    26, 27, 26, 26, 27, 27, 27, 27, 27, 28, 27, 27, 27, 27, 27, 26, // 240..
    30, // 256: EOS
];

const EOS: u16 = 256;
/// A tree node's child that is not there yet.
const NONE: u16 = u16::MAX;
/// Marks a child as a leaf holding a symbol.
const LEAF: u16 = 0x8000;

/// The decoding tree: node `i`'s children for bit 0 and bit 1, each another node's index or
/// `LEAF | symbol`. Built from [`CODE_LENGTHS`] by assigning the canonical codes.
fn tree() -> Vec<[u16; 2]> {
    let mut symbols: Vec<u16> = (0..=EOS).collect();
    symbols.sort_by_key(|&s| (CODE_LENGTHS[s as usize], s));
    let mut nodes = vec![[NONE; 2]];
    let (mut code, mut len) = (0u32, CODE_LENGTHS[symbols[0] as usize]);
    for (i, &sym) in symbols.iter().enumerate() {
        let l = CODE_LENGTHS[sym as usize];
        if i > 0 {
            code = (code + 1) << (l - len);
            len = l;
        }
        let mut node = 0usize;
        for bit in (0..l).rev() {
            let b = ((code >> bit) & 1) as usize;
            if bit == 0 {
                nodes[node][b] = LEAF | sym;
            } else {
                if nodes[node][b] == NONE {
                    nodes.push([NONE; 2]);
                    nodes[node][b] = (nodes.len() - 1) as u16;
                }
                node = nodes[node][b] as usize;
            }
        }
    }
    nodes
}

/// Decodes a Huffman-coded string: padding must be the most significant bits of EOS (all
/// ones) and shorter than a byte; EOS itself is an error.
fn huffman(src: &[u8]) -> Result<Vec<u8>, HpackError> {
    static TREE: std::sync::OnceLock<Vec<[u16; 2]>> = std::sync::OnceLock::new();
    let nodes = TREE.get_or_init(tree);
    let mut out = Vec::with_capacity(src.len() * 8 / 5);
    let (mut node, mut depth, mut all_ones) = (0usize, 0u32, true);
    for byte in src {
        for bit in (0..8).rev() {
            let b = (byte >> bit) & 1;
            let next = nodes[node][b as usize];
            depth += 1;
            all_ones &= b == 1;
            if next == NONE {
                return Err(HpackError::Huffman);
            }
            if next & LEAF != 0 {
                let sym = next & !LEAF;
                if sym == EOS {
                    return Err(HpackError::Huffman);
                }
                out.push(sym as u8);
                (node, depth, all_ones) = (0, 0, true);
            } else {
                node = next as usize;
            }
        }
    }
    if depth > 7 || !all_ones {
        return Err(HpackError::Huffman);
    }
    Ok(out)
}

/// Appends an HPACK integer with an `n`-bit prefix; `first` holds the representation's flag
/// bits.
fn put_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// Appends a string literal without Huffman coding.
fn put_str(out: &mut Vec<u8>, s: &str) {
    put_int(out, 0, 7, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// Appends `name: value` as a literal field without indexing. A name in the static table is
/// referred to by its index.
pub fn put_field(out: &mut Vec<u8>, name: &str, value: &str) {
    match STATIC.iter().position(|(n, _)| *n == name) {
        Some(i) => put_int(out, 0, 4, i + 1),
        None => {
            out.push(0);
            put_str(out, name);
        }
    }
    put_str(out, value);
}

/// Appends a field by its static-table index (`:method POST` is 3, `:scheme http` 6).
pub fn put_indexed(out: &mut Vec<u8>, index: usize) {
    put_int(out, 0x80, 7, index);
}

/// The decoding state of one connection: the dynamic table the agent's encoder fills.
#[derive(Debug, Default)]
pub struct Decoder {
    dynamic: VecDeque<Field>,
    size: usize,
    max: Option<usize>,
}

/// A cursor over a header block.
struct Block<'a> {
    src: &'a [u8],
    at: usize,
}

impl Block<'_> {
    fn byte(&mut self) -> Result<u8, HpackError> {
        let b = *self.src.get(self.at).ok_or(HpackError::Truncated)?;
        self.at += 1;
        Ok(b)
    }

    fn int(&mut self, n: u32) -> Result<usize, HpackError> {
        let max = (1usize << n) - 1;
        let mut v = (self.byte()? as usize) & max;
        if v < max {
            return Ok(v);
        }
        for shift in (0..).step_by(7) {
            if shift > 28 {
                return Err(HpackError::Overflow);
            }
            let b = self.byte()?;
            v += ((b & 0x7f) as usize) << shift;
            if b & 0x80 == 0 {
                break;
            }
        }
        Ok(v)
    }

    fn string(&mut self) -> Result<Vec<u8>, HpackError> {
        let huffman_coded = self.src.get(self.at).ok_or(HpackError::Truncated)? & 0x80 != 0;
        let len = self.int(7)?;
        let end = self.at.checked_add(len).ok_or(HpackError::Overflow)?;
        let raw = self.src.get(self.at..end).ok_or(HpackError::Truncated)?;
        self.at = end;
        if huffman_coded {
            huffman(raw)
        } else {
            Ok(raw.to_vec())
        }
    }
}

impl Decoder {
    fn entry(&self, index: usize) -> Result<Field, HpackError> {
        if index == 0 {
            return Err(HpackError::BadIndex(0));
        }
        if let Some((n, v)) = STATIC.get(index - 1) {
            return Ok((n.as_bytes().to_vec(), v.as_bytes().to_vec()));
        }
        self.dynamic
            .get(index - STATIC.len() - 1)
            .cloned()
            .ok_or(HpackError::BadIndex(index))
    }

    fn max(&self) -> usize {
        self.max.unwrap_or(MAX_TABLE_SIZE)
    }

    fn evict_to(&mut self, limit: usize) {
        while self.size > limit {
            match self.dynamic.pop_back() {
                Some((n, v)) => self.size -= n.len() + v.len() + 32,
                None => break,
            }
        }
    }

    fn insert(&mut self, name: Vec<u8>, value: Vec<u8>) {
        let size = name.len() + value.len() + 32;
        if size > self.max() {
            // An entry larger than the table empties it and is not added (RFC 7541 4.4).
            self.dynamic.clear();
            self.size = 0;
            return;
        }
        self.evict_to(self.max() - size);
        self.size += size;
        self.dynamic.push_front((name, value));
    }

    /// Decodes one complete header block into its fields, in order.
    pub fn decode(&mut self, src: &[u8]) -> Result<Vec<Field>, HpackError> {
        let mut block = Block { src, at: 0 };
        let mut fields = Vec::new();
        let mut total = 0usize;
        while block.at < src.len() {
            let first = src[block.at];
            let field = if first & 0x80 != 0 {
                let index = block.int(7)?;
                self.entry(index)?
            } else if first & 0xe0 == 0x20 {
                let size = block.int(5)?;
                if size > MAX_TABLE_SIZE {
                    return Err(HpackError::TableSize(size));
                }
                self.max = Some(size);
                self.evict_to(size);
                continue;
            } else {
                // Literal: with incremental indexing (01), without (0000) or never (0001).
                let (prefix, index_it) = if first & 0xc0 == 0x40 {
                    (6, true)
                } else {
                    (4, false)
                };
                let name = match block.int(prefix)? {
                    0 => block.string()?,
                    i => self.entry(i)?.0,
                };
                let value = block.string()?;
                if index_it {
                    self.insert(name.clone(), value.clone());
                }
                (name, value)
            };
            total += field.0.len() + field.1.len();
            if total > MAX_LIST {
                return Err(HpackError::TooLarge);
            }
            fields.push(field);
        }
        Ok(fields)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    fn text(fields: &[Field]) -> Vec<(String, String)> {
        fields
            .iter()
            .map(|(n, v)| {
                (
                    String::from_utf8_lossy(n).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn the_code_lengths_make_a_complete_prefix_code_with_eos_all_ones() {
        // Kraft's equality: a length typed wrong would leave a gap or an overlap.
        let kraft: u64 = CODE_LENGTHS.iter().map(|&l| 1u64 << (30 - l)).sum();
        assert_eq!(kraft, 1 << 30);
        // Every node has both children, and EOS is the 30-bit all-ones code.
        let nodes = tree();
        assert_eq!(nodes.len(), 256, "a complete binary tree of 257 leaves");
        assert!(nodes.iter().flatten().all(|&c| c != NONE));
        let mut node = 0usize;
        for _ in 0..29 {
            node = nodes[node][1] as usize;
        }
        assert_eq!(nodes[node][1], LEAF | EOS);
    }

    #[test]
    fn the_rfcs_huffman_examples_decode() {
        // RFC 7541 Appendix C.4 and C.6.
        for (coded, plain) in [
            ("f1e3 c2e5 f23a 6ba0 ab90 f4ff", "www.example.com"),
            ("a8eb 1064 9cbf", "no-cache"),
            ("25a8 49e9 5ba9 7d7f", "custom-key"),
            ("25a8 49e9 5bb8 e8b4 bf", "custom-value"),
            ("6402", "302"),
            ("aec3 771a 4b", "private"),
            (
                "d07a be94 1054 d444 a820 0595 040b 8166 e082 a62d 1bff",
                "Mon, 21 Oct 2013 20:13:21 GMT",
            ),
            (
                "9d29 ad17 1863 c78f 0b97 c8e9 ae82 ae43 d3",
                "https://www.example.com",
            ),
        ] {
            assert_eq!(
                huffman(&hex(coded)).as_deref(),
                Ok(plain.as_bytes()),
                "{plain}"
            );
        }
    }

    #[test]
    fn bad_padding_and_eos_are_refused() {
        // "0" is 00000 (5 bits): padding with zeros, or a whole byte of padding, is invalid.
        assert_eq!(huffman(&[0b0000_0111]), Ok(b"0".to_vec()));
        assert_eq!(huffman(&[0b0000_0000]), Err(HpackError::Huffman));
        assert_eq!(huffman(&[0b0000_0111, 0xff]), Err(HpackError::Huffman));
        assert_eq!(huffman(&[0xff, 0xff, 0xff, 0xff]), Err(HpackError::Huffman));
    }

    #[test]
    fn the_rfcs_response_sequence_decodes_with_its_dynamic_table() {
        // RFC 7541 Appendix C.6: three responses with Huffman coding and a 256-byte table.
        let mut d = Decoder::default();
        // A size update first, as an encoder whose peer allows 256 bytes would send.
        assert_eq!(d.decode(&hex("3fe1 01")), Ok(vec![]));
        let first = d
            .decode(&hex(
                "4882 6402 5885 aec3 771a 4b61 96d0 7abe 9410 54d4 44a8 2005 9504 0b81 66e0 82a6 2d1b ff6e 919d 29ad 1718 63c7 8f0b 97c8 e9ae 82ae 43d3",
            ))
            .expect("first response");
        assert_eq!(
            text(&first),
            [
                (":status", "302"),
                ("cache-control", "private"),
                ("date", "Mon, 21 Oct 2013 20:13:21 GMT"),
                ("location", "https://www.example.com"),
            ]
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
        );
        assert_eq!(d.size, 222);
        let second = d
            .decode(&hex("4883 640e ff c1c0 bf"))
            .expect("second response");
        assert_eq!(text(&second)[0], (":status".to_owned(), "307".to_owned()));
        assert_eq!(text(&second)[3].1, "https://www.example.com");
        assert_eq!(d.size, 222, "one entry in, one evicted");
    }

    #[test]
    fn literals_round_trip_through_the_decoder() {
        let mut out = Vec::new();
        put_indexed(&mut out, 3);
        put_field(&mut out, ":path", "/sluice.v1.Agent/Attach");
        put_field(&mut out, "grpc-timeout", "2000m");
        let long = "x".repeat(300);
        put_field(&mut out, "sluice-long", &long);
        let fields = Decoder::default().decode(&out).expect("decode");
        assert_eq!(
            text(&fields),
            vec![
                (":method".to_owned(), "POST".to_owned()),
                (":path".to_owned(), "/sluice.v1.Agent/Attach".to_owned()),
                ("grpc-timeout".to_owned(), "2000m".to_owned()),
                ("sluice-long".to_owned(), long),
            ]
        );
    }

    #[test]
    fn hostile_blocks_are_errors_not_panics() {
        let mut d = Decoder::default();
        assert_eq!(d.decode(&[0x80]), Err(HpackError::BadIndex(0)));
        assert_eq!(d.decode(&[0xbe]), Err(HpackError::BadIndex(62)));
        assert_eq!(d.decode(&[0x00, 0x05, b'a']), Err(HpackError::Truncated));
        assert_eq!(
            d.decode(&[0x3f, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(HpackError::Overflow)
        );
        assert_eq!(
            d.decode(&[0x3f, 0xe2, 0x1f]),
            Err(HpackError::TableSize(4097))
        );
        // A 4 GiB length claim.
        assert_eq!(
            d.decode(&[0x00, 0x7f, 0xff, 0xff, 0xff, 0x0f]),
            Err(HpackError::Truncated)
        );
    }
}
