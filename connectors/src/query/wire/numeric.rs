//! PostgreSQL `numeric` in its binary format, both ways.

use bytes::{BufMut, BytesMut};

/// Writes a plain decimal (`-123.45`, no exponent) in numeric's binary format: digit count,
/// weight, sign and display scale, then base-10000 digits grouped around the decimal point.
/// Writes a plain decimal (`-123.45`, no exponent) in numeric's binary format: digit count,
/// weight, sign and display scale, then base-10000 digits grouped around the decimal point.
pub(super) fn numeric_to_binary(
    s: &str,
    out: &mut BytesMut,
) -> Result<(), Box<dyn std::error::Error + Sync + Send>> {
    let (negative, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return Err(format!("not a decimal number: {s:?}").into());
    }
    let scale = u16::try_from(frac.len())
        .ok()
        .filter(|s| *s <= 0x3FFF)
        .ok_or("numeric scale too large")?;
    let int = int.trim_start_matches('0');
    let int_pad = (4 - int.len() % 4) % 4;
    let frac_pad = (4 - frac.len() % 4) % 4;
    let mut digits_text = String::with_capacity(int_pad + int.len() + frac.len() + frac_pad);
    digits_text.extend(std::iter::repeat_n('0', int_pad));
    digits_text.push_str(int);
    digits_text.push_str(frac);
    digits_text.extend(std::iter::repeat_n('0', frac_pad));
    let groups: Vec<i16> = digits_text
        .as_bytes()
        .chunks(4)
        .map(|c| c.iter().fold(0i16, |acc, d| acc * 10 + i16::from(d - b'0')))
        .collect();
    let int_groups = (int_pad + int.len()) / 4;
    let mut weight = i16::try_from(int_groups).map_err(|_| "numeric too large")? - 1;
    let first = groups.iter().position(|g| *g != 0).unwrap_or(groups.len());
    let last = groups
        .iter()
        .rposition(|g| *g != 0)
        .map_or(first, |p| p + 1);
    let digits = &groups[first..last];
    weight -= i16::try_from(first).map_err(|_| "numeric too small")?;
    if digits.is_empty() {
        weight = 0;
    }
    out.put_i16(i16::try_from(digits.len()).map_err(|_| "numeric too long")?);
    out.put_i16(weight);
    out.put_u16(if negative && !digits.is_empty() {
        0x4000
    } else {
        0
    });
    out.put_u16(scale);
    for d in digits {
        out.put_i16(*d);
    }
    Ok(())
}

/// Reads numeric's binary format back into decimal text.
pub(super) fn numeric_from_binary(
    raw: &[u8],
) -> Result<String, Box<dyn std::error::Error + Sync + Send>> {
    let word = |i: usize| -> Result<u16, Box<dyn std::error::Error + Sync + Send>> {
        raw.get(2 * i..2 * i + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or_else(|| "numeric value too short".into())
    };
    let count = usize::from(word(0)?);
    let weight = i64::from(word(1)? as i16);
    let sign = word(2)?;
    let scale = usize::from(word(3)?);
    match sign {
        0xC000 => return Ok("NaN".to_owned()),
        0xD000 => return Ok("Infinity".to_owned()),
        0xF000 => return Ok("-Infinity".to_owned()),
        0x0000 | 0x4000 => {}
        _ => return Err("invalid numeric sign".into()),
    }
    let digits = (0..count)
        .map(|k| word(4 + k).map(i64::from))
        .collect::<Result<Vec<_>, _>>()?;
    if digits.iter().any(|d| !(0..10_000).contains(d)) {
        return Err("invalid numeric digit".into());
    }
    // digits[k] counts 10000^(weight - k).
    let digit_at = |w: i64| -> i64 {
        usize::try_from(weight - w)
            .ok()
            .and_then(|k| digits.get(k).copied())
            .unwrap_or(0)
    };
    let mut text = String::new();
    if sign == 0x4000 {
        text.push('-');
    }
    if weight < 0 {
        text.push('0');
    } else {
        text.push_str(&digit_at(weight).to_string());
        for w in (0..weight).rev() {
            text.push_str(&format!("{:04}", digit_at(w)));
        }
    }
    if scale > 0 {
        let mut frac = String::with_capacity(scale + 4);
        let mut w = -1;
        while frac.len() < scale {
            frac.push_str(&format!("{:04}", digit_at(w)));
            w -= 1;
        }
        frac.truncate(scale);
        text.push('.');
        text.push_str(&frac);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_binary_round_trips() {
        for text in [
            "0",
            "0.00",
            "123.45",
            "-0.50",
            "10000",
            "0.0001",
            "0.00001",
            "-98765432109876.54321",
            "18446744073709551615",
            "1.10",
        ] {
            let mut out = BytesMut::new();
            numeric_to_binary(text, &mut out).unwrap();
            let back = numeric_from_binary(&out).unwrap();
            let expected = text.trim_start_matches('-');
            let expected = if text.starts_with('-')
                && expected.bytes().any(|b| b.is_ascii_digit() && b != b'0')
            {
                format!("-{expected}")
            } else {
                expected.to_owned()
            };
            assert_eq!(back, expected, "{text}");
        }
        // 123.45 as PostgreSQL sends it: 2 digits, weight 0, positive, scale 2: 123, 4500.
        let mut out = BytesMut::new();
        numeric_to_binary("123.45", &mut out).unwrap();
        assert_eq!(&out[..], &[0, 2, 0, 0, 0, 0, 0, 2, 0, 123, 0x11, 0x94]);
        assert!(numeric_to_binary("1e5", &mut BytesMut::new()).is_err());
    }
}
