//! MAC addresses and the modified EUI-64 interface identifiers derived from them (RFC 4291, §2.5.1
//! and Appendix A): a device's identity address is its MAC turned into an interface ID under the
//! gateway's identity prefix, so an operator can predict it from the label on the device.

use std::fmt;
use std::net::Ipv6Addr;
use std::str::FromStr;

use ipnet::Ipv6Net;

/// A 48-bit IEEE 802 MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "'{0}' is not a MAC address (expected 6 hex bytes, e.g. a2:3f:f8:68:ec:8f, a2-3f-f8-68-ec-8f or a23ff868ec8f)"
)]
pub struct MacParseError(pub String);

impl FromStr for Mac {
    type Err = MacParseError;

    /// Accepts `a2:3f:f8:68:ec:8f`, `a2-3f-f8-68-ec-8f` and the bare `a23ff868ec8f` that CMXsafe
    /// deployments use as identity names.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError(s.to_string());
        let hex: String = if s.len() == 12 {
            s.to_string()
        } else if s.len() == 17 {
            let sep = s.as_bytes()[2];
            if sep != b':' && sep != b'-' {
                return Err(err());
            }
            let mut out = String::with_capacity(12);
            for (i, part) in s.split(sep as char).enumerate() {
                if i >= 6 || part.len() != 2 {
                    return Err(err());
                }
                out.push_str(part);
            }
            out
        } else {
            return Err(err());
        };
        let mut bytes = [0u8; 6];
        for (i, byte) in bytes.iter_mut().enumerate() {
            let pair = hex.get(2 * i..2 * i + 2).ok_or_else(err)?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| err())?;
        }
        Ok(Mac(bytes))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl Mac {
    /// The modified EUI-64 interface identifier: `ff:fe` inserted in the middle and the
    /// universal/local bit (0x02 of the first octet) inverted.
    pub fn modified_eui64(&self) -> [u8; 8] {
        let m = self.0;
        [m[0] ^ 0x02, m[1], m[2], 0xff, 0xfe, m[3], m[4], m[5]]
    }

    /// The identity address of this MAC under `prefix`: the prefix's network bits, then the
    /// interface identifier in the low 64 bits. The prefix must be /64 or shorter (checked when the
    /// configuration is validated); bits between the prefix and bit 64 are zero.
    pub fn identity_address(&self, prefix: Ipv6Net) -> Ipv6Addr {
        let network = u128::from(prefix.network());
        let iid = u64::from_be_bytes(self.modified_eui64());
        let high_mask: u128 = !0u128 << 64;
        Ipv6Addr::from((network & high_mask) | u128::from(iid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefix() -> Ipv6Net {
        "fd63:6d78::/64".parse().unwrap()
    }

    #[test]
    fn rfc4291_appendix_a_vector() {
        // RFC 4291 Appendix A: 34-56-78-9A-BC-DE -> 3656:78FF:FE9A:BCDE.
        let mac: Mac = "34-56-78-9A-BC-DE".parse().unwrap();
        assert_eq!(
            mac.modified_eui64(),
            [0x36, 0x56, 0x78, 0xff, 0xfe, 0x9a, 0xbc, 0xde]
        );
        let fe80: Ipv6Net = "fe80::/64".parse().unwrap();
        assert_eq!(
            mac.identity_address(fe80),
            "fe80::3656:78ff:fe9a:bcde".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn universal_local_bit_is_inverted_both_ways() {
        // A locally administered MAC (0x02 set) yields a cleared bit, and vice versa.
        let local: Mac = "02:00:5e:10:00:01".parse().unwrap();
        assert_eq!(local.modified_eui64()[0], 0x00);
        let global: Mac = "00:00:5e:10:00:01".parse().unwrap();
        assert_eq!(global.modified_eui64()[0], 0x02);
    }

    #[test]
    fn cmxsafe_device_name_format() {
        let mac: Mac = "a23ff868ec8f".parse().unwrap();
        assert_eq!(mac, "a2:3f:f8:68:ec:8f".parse().unwrap());
        assert_eq!(
            mac.identity_address(prefix()),
            "fd63:6d78::a03f:f8ff:fe68:ec8f".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(mac.to_string(), "a2:3f:f8:68:ec:8f");
    }

    #[test]
    fn shorter_prefix_keeps_its_bits_and_zero_fills() {
        let p: Ipv6Net = "fd00:1:2::/48".parse().unwrap();
        let mac: Mac = "34:56:78:9a:bc:de".parse().unwrap();
        assert_eq!(
            mac.identity_address(p),
            "fd00:1:2:0:3656:78ff:fe9a:bcde".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn rejects_malformed_macs() {
        for bad in [
            "",
            "a2:3f:f8:68:ec",
            "a2:3f:f8:68:ec:8g",
            "a2:3f-f8:68:ec:8f",
            "a23ff868ec8",
            "a2.3f.f8.68.ec.8f",
        ] {
            let err = bad.parse::<Mac>().unwrap_err();
            assert!(err.to_string().contains("is not a MAC address"), "{bad}: {err}");
        }
    }
}
