//! The values of QEMU options `vlapic qemu` accepts (`-smp`, `-m`, `-initrd`,
//! `key=value` lists, `kernel-irqchip`), parsed with QEMU's rules and error texts.

use super::MAX_CPUS;

pub(super) fn is_help(v: &str) -> bool {
    v == "help" || v == "?"
}

/// `key=value` pairs of a QEMU option value; a leading element without `=`
/// comes back with an empty key.
pub(super) fn props(v: &str) -> Vec<(String, String)> {
    v.split(',')
        .enumerate()
        .map(|(i, p)| match p.split_once('=') {
            Some((k, val)) => (k.to_string(), val.to_string()),
            None if i == 0 => (String::new(), p.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect()
}

pub(super) fn parse_uint(opt: &str, what: &str, v: &str) -> Result<u64, String> {
    let r = if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16)
    } else {
        v.parse::<u64>()
    };
    r.map_err(|_| format!("{opt}: {what} '{v}' is not a number"))
}

pub(super) fn parse_smp(v: &str) -> Result<usize, String> {
    let mut cpus: Option<u64> = None;
    let mut maxcpus: Option<u64> = None;
    let mut topo: u64 = 1;
    let mut any_topo = false;
    for (k, val) in props(v) {
        match k.as_str() {
            "" | "cpus" => cpus = Some(parse_uint("-smp", "cpus", &val)?),
            "maxcpus" => maxcpus = Some(parse_uint("-smp", "maxcpus", &val)?),
            "sockets" | "dies" | "clusters" | "cores" | "threads" => {
                any_topo = true;
                topo = topo.saturating_mul(parse_uint("-smp", &k, &val)?);
            }
            _ => return Err(format!("-smp: property '{k}' not supported")),
        }
    }
    let n = match cpus {
        Some(n) => n,
        None if any_topo => topo,
        None => maxcpus.unwrap_or(1),
    };
    if n == 0 {
        return Err("-smp: cpus must be at least 1".into());
    }
    if let Some(m) = maxcpus {
        if m != n {
            return Err(format!(
                "-smp: maxcpus={m} differs from cpus={n}: CPU hotplug is not supported"
            ));
        }
    }
    if n > MAX_CPUS as u64 {
        // The words QEMU uses, which kvm-unit-tests' --probe-maxsmp looks for
        // (it takes the last word as the limit).
        return Err(format!(
            "-smp: Invalid SMP CPUs {n}. The max CPUs supported by machine 'pc' is {MAX_CPUS}"
        ));
    }
    Ok(n as usize)
}

pub(super) fn parse_memory(v: &str) -> Result<u64, String> {
    let mut size: Option<String> = None;
    for (k, val) in props(v) {
        match k.as_str() {
            "" | "size" => size = Some(val),
            _ => {
                return Err(format!(
                    "-m: property '{k}' not supported (no memory hotplug)"
                ))
            }
        }
    }
    let s = size.ok_or("-m: no size given")?;
    let (num, mult_kib): (&str, u64) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1,
                'M' => 1 << 10,
                'G' => 1 << 20,
                'T' => 1 << 30,
                _ => return Err(format!("-m: unknown size suffix in '{s}'")),
            };
            (&s[..i], m)
        }
        _ => (s.as_str(), 1 << 10),
    };
    let n = parse_uint("-m", "size", num)?;
    let kib = n
        .checked_mul(mult_kib)
        .ok_or_else(|| format!("-m: size '{s}' is too large"))?;
    if kib % 1024 != 0 {
        return Err(format!("-m: size '{s}' is not a whole number of MiB"));
    }
    let mib = kib / 1024;
    let (lo, hi) = (
        vlapic_vmm::memory::MIN_MEMORY_MIB,
        vlapic_vmm::memory::MAX_MEMORY_MIB,
    );
    if !(lo..=hi).contains(&mib) {
        return Err(format!("-m: {mib} MiB is outside {lo}-{hi} MiB"));
    }
    Ok(mib)
}

/// `-initrd`: comma-separated entries (`,,` is a literal comma), each a file name
/// optionally followed by a space and arguments; the module string is the whole
/// entry, as QEMU's multiboot loader passes it.
pub(super) fn parse_initrd(v: &str) -> Result<Vec<(String, String)>, String> {
    let mut entries = vec![String::new()];
    let mut chars = v.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(e) = entries.last_mut() {
                    e.push(',');
                }
            } else {
                entries.push(String::new());
            }
        } else if let Some(e) = entries.last_mut() {
            e.push(c);
        }
    }
    entries
        .into_iter()
        .map(|e| {
            let file = e.split(' ').next().unwrap_or("").to_string();
            if file.is_empty() {
                Err(format!("-initrd: empty module entry in '{v}'"))
            } else {
                Ok((file, e))
            }
        })
        .collect()
}

pub(super) fn irqchip_value(opt: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "" => Ok(true),
        "off" | "split" => Ok(false),
        _ => Err(format!(
            "{opt}: kernel_irqchip={v}: expected on, off or split"
        )),
    }
}
