//! The CMOS RTC's registers, interrupts and saved state against the Motorola
//! MC146818A data sheet (register sections cited per test), on VM time given by the
//! test.

use vlapic_vmm::rtc::{Rtc, UIP_NS};
use vlapic_vmm::wire::{Reader, Writer};

const S: u64 = 1_000_000_000;
/// 2024-02-29 23:59:58 UTC, a Thursday.
const LEAP_EVE: i64 = 1_709_251_198;

fn read(r: &mut Rtc, reg: u8, now: u64) -> u8 {
    r.port_out(0x70, reg, now);
    r.port_in(0x71, now).0
}

fn write(r: &mut Rtc, reg: u8, v: u8, now: u64) -> Option<bool> {
    r.port_out(0x70, reg, now);
    r.port_out(0x71, v, now)
}

fn time(r: &mut Rtc, now: u64) -> [u8; 8] {
    [0u8, 2, 4, 6, 7, 8, 9, 0x32].map(|i| read(r, i, now))
}

#[test]
fn time_and_date_count_in_bcd_across_a_leap_day() {
    // Registers 0, 2, 4, 6–9 (data sheet "Time, calendar and alarm locations"), BCD
    // and 24-hour at power-on (B = 0x02); the century at 0x32 as QEMU and ACPI use.
    let mut r = Rtc::new(LEAP_EVE, 0, 128 << 20);
    assert_eq!(
        time(&mut r, 0),
        [0x58, 0x59, 0x23, 5, 0x29, 0x02, 0x24, 0x20]
    );
    assert_eq!(time(&mut r, S - 1), time(&mut r, 0), "no update before 1 s");
    // Two updates later: 2024-03-01 00:00:00, Friday (day of week 6, Sunday = 1).
    assert_eq!(
        time(&mut r, 2 * S),
        [0x00, 0x00, 0x00, 6, 0x01, 0x03, 0x24, 0x20]
    );
    assert_eq!(r.secs(2 * S + 1), LEAP_EVE + 2);
}

#[test]
fn binary_and_twelve_hour_formats_follow_register_b() {
    // Register B: DM (bit 2) binary, 24/12 (bit 1); 12-hour hours carry PM in bit 7.
    let mut r = Rtc::new(LEAP_EVE, 0, 128 << 20);
    write(&mut r, 0x0B, 0x06, 0);
    assert_eq!(time(&mut r, 0), [58, 59, 23, 5, 29, 2, 24, 20]);
    write(&mut r, 0x0B, 0x00, 0);
    assert_eq!(read(&mut r, 4, 0), 0x91, "11 PM in BCD");
    write(&mut r, 0x0B, 0x04, 0);
    assert_eq!(read(&mut r, 4, 2 * S), 12, "12 AM in binary");
}

#[test]
fn update_in_progress_precedes_each_update() {
    // Register A bit 7: UIP is 1 for 244 µs before the update cycle.
    let mut r = Rtc::new(LEAP_EVE, 0, 128 << 20);
    assert_eq!(read(&mut r, 0x0A, 0), 0x26);
    assert_eq!(read(&mut r, 0x0A, S - UIP_NS - 1000), 0x26);
    assert_eq!(read(&mut r, 0x0A, S - UIP_NS + 1000), 0xA6);
    assert_eq!(read(&mut r, 0x0A, S + 1000), 0x26);
    // SET stops updates: no UIP either; writes to UIP are ignored.
    write(&mut r, 0x0B, 0x82, S);
    assert_eq!(read(&mut r, 0x0A, 2 * S - 1000), 0x26);
    write(&mut r, 0x0A, 0xA6, 2 * S);
    assert_eq!(read(&mut r, 0x0A, 2 * S), 0x26);
}

#[test]
fn set_mode_freezes_and_resumes_from_what_the_guest_wrote() {
    // Register B bit 7 (SET): updates stop and the time registers can be written;
    // clearing it resumes counting from them. SET also clears UIE.
    let mut r = Rtc::new(LEAP_EVE, 0, 128 << 20);
    write(&mut r, 0x0B, 0x02 | 0x10, 0);
    write(&mut r, 0x0B, 0x82 | 0x10, S / 2);
    assert_eq!(read(&mut r, 0x0B, S / 2), 0x82, "UIE cleared by SET");
    for (reg, v) in [
        (0u8, 0x30u8),
        (2, 0x15),
        (4, 0x10),
        (7, 0x04),
        (8, 0x07),
        (9, 0x99),
    ] {
        write(&mut r, reg, v, S / 2);
    }
    write(&mut r, 0x32, 0x19, S / 2);
    assert_eq!(read(&mut r, 0, 5 * S), 0x30, "frozen while SET");
    write(&mut r, 0x0B, 0x02, 5 * S + S / 4);
    // The divider kept its phase: the next update is at 6 s, not 1 s after.
    assert_eq!(read(&mut r, 0, 6 * S - 1), 0x30);
    assert_eq!(
        time(&mut r, 6 * S),
        [0x31, 0x15, 0x10, 1, 0x04, 0x07, 0x99, 0x19]
    );
}

#[test]
fn periodic_interrupt_raises_irq8_until_status_c_is_read() {
    // Register A RS = 6: 976.5625 µs; register B PIE; register C PF and IRQF, cleared
    // by reading C; the IRQ output stays asserted until then.
    let mut r = Rtc::new(LEAP_EVE, 0, 128 << 20);
    assert_eq!(write(&mut r, 0x0B, 0x42, 0), None);
    let d = r.next_deadline(0).expect("armed");
    assert_eq!(d, 976_562);
    assert_eq!(r.tick(d - 1), None);
    assert_eq!(r.tick(d), Some(true));
    assert!(r.line());
    assert_eq!(r.next_deadline(d), None, "nothing more until C is read");
    assert_eq!(r.tick(10 * d), None, "no new edge while IRQF is set");
    r.port_out(0x70, 0x0C, 10 * d);
    assert_eq!(r.port_in(0x71, 10 * d), (0xC0, Some(false)));
    assert_eq!(read(&mut r, 0x0C, 10 * d), 0, "read to clear");
    // PF is set at every period even with PIE off, without an interrupt.
    write(&mut r, 0x0B, 0x02, 10 * d);
    assert_eq!(r.next_deadline(10 * d), None);
    assert_eq!(r.tick(12 * d), None);
    assert_eq!(read(&mut r, 0x0C, 12 * d), 0x40);
    // Rate 0 stops it; status D reads VRT, C and D ignore writes.
    write(&mut r, 0x0A, 0x20, 12 * d);
    assert_eq!(read(&mut r, 0x0C, 20 * d), 0x00);
    assert_eq!(read(&mut r, 0x0D, 0), 0x80);
    write(&mut r, 0x0D, 0, 0);
    write(&mut r, 0x0C, 0xF0, 0);
    assert_eq!(read(&mut r, 0x0D, 0), 0x80);
    assert_eq!(read(&mut r, 0x0C, 20 * d), 0x00);
}

#[test]
fn update_ended_and_alarm_interrupts() {
    // Register B UIE: UF at each update; AIE: AF when the time equals the alarm
    // bytes 1, 3, 5, where 0xC0–0xFF is "don't care".
    let mut r = Rtc::new(LEAP_EVE, 0, 128 << 20);
    write(&mut r, 0x0B, 0x12, 0);
    assert_eq!(r.next_deadline(0), Some(S));
    assert_eq!(r.tick(S), Some(true));
    // PF too: the periodic flag runs at the rate in A even with PIE off.
    assert_eq!(read(&mut r, 0x0C, S), 0xD0);
    // Alarm at 00:00:05 (five seconds after the leap eve clock passes midnight).
    write(&mut r, 0x0B, 0x22, S);
    write(&mut r, 1, 0x05, S);
    write(&mut r, 3, 0x00, S);
    write(&mut r, 5, 0x00, S);
    assert_eq!(r.tick(6 * S), None);
    assert_eq!(r.tick(7 * S), Some(true));
    // IRQF and AF, and UF (set at every update whatever UIE says).
    assert_eq!(read(&mut r, 0x0C, 7 * S) & 0xB0, 0xB0);
    // Don't-care hours and minutes: matches every minute at :05 — but not at :06.
    write(&mut r, 3, 0xFF, 7 * S);
    write(&mut r, 5, 0xC0, 7 * S);
    assert_eq!(r.tick(8 * S), None);
    assert_eq!(r.tick(67 * S - 1), None);
    assert_eq!(r.tick(67 * S), Some(true));
}

#[test]
fn index_port_keeps_the_nmi_mask_bit() {
    // Port 0x70 bit 7 disables NMI on a PC; the register index is bits 6:0.
    let mut r = Rtc::new(LEAP_EVE, 0, 128 << 20);
    r.port_out(0x70, 0x8D, 0);
    assert!(r.nmi_masked());
    assert_eq!(
        r.port_in(0x71, 0).0,
        0x80,
        "register D through a masked index"
    );
    assert_eq!(r.port_in(0x70, 0).0, 0xFF, "the index port is write-only");
    r.port_out(0x70, 0x0D, 0);
    assert!(!r.nmi_masked());
    // CMOS RAM bytes 0x0E–0x7F read back.
    for i in 0x0Eu8..0x80 {
        if i != 0x32 {
            write(&mut r, i, i ^ 0x5A, 0);
            assert_eq!(read(&mut r, i, 0), i ^ 0x5A);
        }
    }
}

#[test]
fn memory_size_bytes_sit_where_a_bios_puts_them() {
    // 0x15/0x16 base KiB, 0x17/0x18 and 0x30/0x31 extended KiB above 1 MiB,
    // 0x34/0x35 64 KiB units above 16 MiB, 0x5B–0x5D 64 KiB units above 4 GiB.
    let mut r = Rtc::new(0, 0, 32 << 20);
    let w = |r: &mut Rtc, lo: u8| u16::from(read(r, lo, 0)) | u16::from(read(r, lo + 1, 0)) << 8;
    assert_eq!(w(&mut r, 0x15), 640);
    assert_eq!(w(&mut r, 0x17), 31 * 1024);
    assert_eq!(w(&mut r, 0x30), 31 * 1024);
    assert_eq!(w(&mut r, 0x34), 16 * 16, "16 MiB above 16 MiB");
    assert_eq!(read(&mut r, 0x5B, 0), 0);
    let mut big = Rtc::new(0, 0, 6 << 30);
    assert_eq!(w(&mut big, 0x17), 0xFFFF);
    assert_eq!(
        w(&mut big, 0x34),
        ((0xE000_0000u64 - (16 << 20)) >> 16) as u16
    );
    let high = (6u64 << 30) - 0xE000_0000;
    let got = u32::from(read(&mut big, 0x5B, 0))
        | u32::from(read(&mut big, 0x5C, 0)) << 8
        | u32::from(read(&mut big, 0x5D, 0)) << 16;
    assert_eq!(u64::from(got), high >> 16);
}

#[test]
fn divider_reset_stops_the_clock_and_restarts_half_a_second_later() {
    // Register A DV 6:4: 010 runs the 32.768 kHz time base; other values hold the
    // clock here; leaving reset, the first update is 500 ms later.
    let mut r = Rtc::new(LEAP_EVE, 0, 128 << 20);
    write(&mut r, 0x0A, 0x70, S / 4);
    assert_eq!(read(&mut r, 0, 10 * S), 0x58);
    write(&mut r, 0x0A, 0x26, 10 * S);
    assert_eq!(read(&mut r, 0, 10 * S + S / 2 - 1), 0x58);
    assert_eq!(read(&mut r, 0, 10 * S + S / 2), 0x59);
}

#[test]
fn saved_state_round_trips_and_continues() {
    let mut r = Rtc::new(LEAP_EVE, 3 * S, 64 << 20);
    write(&mut r, 0x0B, 0x42, 3 * S);
    r.port_out(0x70, 0x8C, 3 * S);
    let mut w = Writer::default();
    r.encode(&mut w);
    let mut rd = Reader::new(&w.buf, "RTC0");
    let mut back = Rtc::decode(&mut rd).expect("decodes");
    rd.finish().expect("consumed");
    assert_eq!(back, r);
    assert!(back.nmi_masked());
    assert_eq!(time(&mut back, 9 * S), time(&mut r, 9 * S));
    assert_eq!(back.next_deadline(9 * S), r.next_deadline(9 * S));
    for n in 0..w.buf.len() {
        assert!(Rtc::decode(&mut Reader::new(&w.buf[..n], "RTC0")).is_err());
    }
    let mut bad = w.buf.clone();
    *bad.last_mut().unwrap() = 7;
    assert!(Rtc::decode(&mut Reader::new(&bad, "RTC0")).is_err());
    // Any byte flipped: an error or a state that runs without panicking.
    for i in 0..w.buf.len() {
        let mut f = w.buf.clone();
        f[i] ^= 0xFF;
        if let Ok(mut d) = Rtc::decode(&mut Reader::new(&f, "RTC0")) {
            let _ = time(&mut d, 1 << 40);
            let _ = d.next_deadline(u64::MAX);
            let _ = d.tick(1 << 41);
        }
    }
}

#[test]
fn rebase_keeps_the_time_and_the_divider_phase() {
    // A restore into a VM whose clock reads differently: the same time is shown and
    // the next update comes as far ahead as it was at the save.
    let mut r = Rtc::new(LEAP_EVE, 0, 128 << 20);
    let saved_at = 5 * S + S / 4;
    let shown = time(&mut r, saved_at);
    for to in [S / 2, 1 << 45] {
        let mut b = r.clone();
        b.rebase(saved_at, to);
        assert_eq!(time(&mut b, to), shown);
        assert_eq!(time(&mut b, to + 3 * S / 4 - 1), shown);
        assert_eq!(b.secs(to + 3 * S / 4), LEAP_EVE + 6);
    }
}

#[test]
fn state_from_a_file_with_extreme_times_never_panics() {
    // The clock's seconds are a signed 64-bit count from a file: the ends of the
    // range, with every interrupt enabled and the alarm on "don't care".
    for secs in [i64::MIN, i64::MIN + 86_400, -1, i64::MAX - 1, i64::MAX] {
        let mut r = Rtc::new(secs, 0, 1 << 20);
        write(&mut r, 0x0B, 0x72, 0);
        for reg in [1u8, 3, 5] {
            write(&mut r, reg, 0xFF, 0);
        }
        for now in [0, 3 * S, 100_000 * S] {
            let _ = time(&mut r, now);
            let _ = r.tick(now);
            let _ = r.next_deadline(now);
            read(&mut r, 0x0C, now);
        }
        r.rebase(5 * S, 1);
    }
}
