//! Regions: a range of host virtual memory and where its bytes come from.

use serde::Serialize;

/// Regions one session may have at most. What a session costs the server
/// is bounded by the source: regions may not share source bytes and must
/// lie inside it, so the per-page state (2 bytes per page) is at most
/// 2 bytes per 4 KiB of the source, about 128 KiB per GiB. This bounds the
/// rest: about 100 bytes per region, and a check that sorts them. (A
/// Firecracker VM has 1 region, 2 above 3 GiB on x86, plus one per
/// hot-plugged memory slot.)
pub const MAX_REGIONS: usize = 4096;

/// Page sizes a region can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PageSize {
    /// 4 KiB base pages.
    Base4K,
    /// 2 MiB hugetlbfs pages.
    Huge2M,
}

impl PageSize {
    pub const fn bytes(self) -> usize {
        match self {
            PageSize::Base4K => 4096,
            PageSize::Huge2M => 2 << 20,
        }
    }

    /// The page size for `bytes`, if it is one pagewire serves.
    pub fn from_bytes(bytes: u64) -> Option<PageSize> {
        match bytes {
            4096 => Some(PageSize::Base4K),
            0x20_0000 => Some(PageSize::Huge2M),
            _ => None,
        }
    }
}

/// A range of registered memory `[host_base, host_base+len)` whose bytes are
/// the source's `[source_offset, source_offset+len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Region {
    pub host_base: u64,
    pub len: u64,
    pub source_offset: u64,
    pub page_size: PageSize,
}

/// Why a set of regions cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    #[error("region {index}: size is zero")]
    Empty { index: usize },
    #[error("region {index}: {what} {value:#x} is not a multiple of the page size {page_size:#x}")]
    Misaligned {
        index: usize,
        what: &'static str,
        value: u64,
        page_size: u64,
    },
    #[error("region {index}: [{start:#x}, {start:#x}+{len:#x}) overflows the address space")]
    Overflow { index: usize, start: u64, len: u64 },
    #[error("regions {a} and {b} overlap in host memory")]
    Overlap { a: usize, b: usize },
    #[error(
        "regions {a} and {b} take their bytes from the same part of the source (from offset \
         {offset:#x}): each byte of the memory file belongs to one region"
    )]
    SourceOverlap { a: usize, b: usize, offset: u64 },
    #[error("{count} regions: at most {max} are served per VM")]
    TooMany { count: usize, max: usize },
    #[error(
        "region {index}: source bytes [{offset:#x}, {end:#x}) lie past the end of the source \
         ({source_len:#x} bytes)"
    )]
    PastSource {
        index: usize,
        offset: u64,
        end: u64,
        source_len: u64,
    },
}

impl Region {
    pub fn page_bytes(&self) -> u64 {
        self.page_size.bytes() as u64
    }

    pub fn pages(&self) -> usize {
        (self.len / self.page_bytes()) as usize
    }

    pub fn end(&self) -> u64 {
        self.host_base + self.len
    }

    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.host_base && addr < self.end()
    }
}

/// Checks a layout: at most [`MAX_REGIONS`] regions, every one non-empty,
/// page aligned (host address and size to its page size, source offset to
/// 4 KiB), inside the address space and inside the source, no two
/// overlapping in host memory, and no two sharing bytes of the source. So
/// the pages a layout declares are at most the source's.
pub fn validate(regions: &[Region], source_len: u64) -> Result<(), RegionError> {
    if regions.len() > MAX_REGIONS {
        return Err(RegionError::TooMany {
            count: regions.len(),
            max: MAX_REGIONS,
        });
    }
    for (index, r) in regions.iter().enumerate() {
        let ps = r.page_bytes();
        if r.len == 0 {
            return Err(RegionError::Empty { index });
        }
        for (what, value, align) in [
            ("host address", r.host_base, ps),
            ("size", r.len, ps),
            ("source offset", r.source_offset, 4096),
        ] {
            if value % align != 0 {
                return Err(RegionError::Misaligned {
                    index,
                    what,
                    value,
                    page_size: align,
                });
            }
        }
        if r.host_base.checked_add(r.len).is_none() {
            return Err(RegionError::Overflow {
                index,
                start: r.host_base,
                len: r.len,
            });
        }
        match r.source_offset.checked_add(r.len) {
            Some(end) if end <= source_len => {}
            end => {
                return Err(RegionError::PastSource {
                    index,
                    offset: r.source_offset,
                    end: end.unwrap_or(u64::MAX),
                    source_len,
                })
            }
        }
    }
    let mut order: Vec<usize> = (0..regions.len()).collect();
    order.sort_by_key(|&i| regions[i].host_base);
    for w in order.windows(2) {
        let (a, b) = (&regions[w[0]], &regions[w[1]]);
        if a.end() > b.host_base {
            return Err(RegionError::Overlap {
                a: w[0].min(w[1]),
                b: w[0].max(w[1]),
            });
        }
    }
    // Inside the source (checked above), so these ends do not overflow.
    order.sort_by_key(|&i| regions[i].source_offset);
    for w in order.windows(2) {
        let (a, b) = (&regions[w[0]], &regions[w[1]]);
        if a.source_offset + a.len > b.source_offset {
            return Err(RegionError::SourceOverlap {
                a: w[0].min(w[1]),
                b: w[0].max(w[1]),
                offset: b.source_offset,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(host: u64, len: u64, off: u64) -> Region {
        Region {
            host_base: host,
            len,
            source_offset: off,
            page_size: PageSize::Base4K,
        }
    }

    #[test]
    fn accepts_end_to_end_layout() {
        let regions = [r(0x10000, 0x4000, 0), r(0x40000, 0x2000, 0x4000)];
        assert_eq!(validate(&regions, 0x6000), Ok(()));
    }

    #[test]
    fn rejects_bad_layouts() {
        assert!(matches!(
            validate(&[r(0x1000, 0, 0)], 1 << 20),
            Err(RegionError::Empty { .. })
        ));
        assert!(matches!(
            validate(&[r(0x1001, 0x1000, 0)], 1 << 20),
            Err(RegionError::Misaligned {
                what: "host address",
                ..
            })
        ));
        assert!(matches!(
            validate(&[r(0x1000, 0x1800, 0)], 1 << 20),
            Err(RegionError::Misaligned { what: "size", .. })
        ));
        assert!(matches!(
            validate(&[r(0x1000, 0x1000, 0x10)], 1 << 20),
            Err(RegionError::Misaligned {
                what: "source offset",
                ..
            })
        ));
        assert!(matches!(
            validate(&[r(0x1000, 0x2000, 0), r(0x2000, 0x1000, 0x2000)], 1 << 20),
            Err(RegionError::Overlap { a: 0, b: 1 })
        ));
        assert!(matches!(
            validate(&[r(0x1000, 0x2000, 0x1000)], 0x2000),
            Err(RegionError::PastSource { .. })
        ));
        assert!(matches!(
            validate(&[r(u64::MAX - 0xfff, 0x2000, 0)], u64::MAX),
            Err(RegionError::Overflow { .. })
        ));
        // Two regions over the same bytes of the file: a handshake that
        // claims more memory than the file holds.
        assert!(matches!(
            validate(
                &[r(0x10000, 0x2000, 0), r(0x40000, 0x2000, 0x1000)],
                1 << 20
            ),
            Err(RegionError::SourceOverlap {
                a: 0,
                b: 1,
                offset: 0x1000
            })
        ));
        let many: Vec<Region> = (0..=MAX_REGIONS as u64)
            .map(|i| r(0x10_0000 + i * 0x2000, 0x1000, i * 0x1000))
            .collect();
        assert!(matches!(
            validate(&many, 1 << 30),
            Err(RegionError::TooMany {
                max: MAX_REGIONS,
                ..
            })
        ));
        assert_eq!(validate(&many[..MAX_REGIONS], 1 << 30), Ok(()));
        let huge = Region {
            host_base: 0x20_0000 + 0x1000,
            len: 0x20_0000,
            source_offset: 0,
            page_size: PageSize::Huge2M,
        };
        assert!(matches!(
            validate(&[huge], 1 << 30),
            Err(RegionError::Misaligned { .. })
        ));
    }
}
