use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::fs::FileExt;

use vmm_sys_util::tempfile::TempFile;

use super::*;

crate::metric_set! {
    /// A set for the tests.
    pub struct TestMetrics {
        /// First.
        alpha,
        /// Second.
        beta_bytes,
    }
}

/// A 4096-byte sealed memfd, as the VMM creates it.
fn memfd(size: u64) -> File {
    // SAFETY: memfd_create takes a NUL-terminated name and flags and returns a new fd or -1.
    let fd = unsafe {
        libc::memfd_create(
            c"skiff-metrics-test".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: fd is fresh and owned by nobody else.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).expect("size");
    // SAFETY: F_ADD_SEALS on a memfd we own.
    let ret = unsafe {
        libc::fcntl(
            f.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
        )
    };
    assert_eq!(ret, 0, "seal");
    f
}

/// A duplicate of `f` for `from_fd` to own (the device process's inherited fd).
fn inherited(f: &File) -> RawFd {
    f.try_clone().expect("dup").into_raw_fd()
}

fn u64_at(f: &File, off: u64) -> u64 {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, off).expect("read");
    u64::from_le_bytes(b)
}

fn u32_at(f: &File, off: u64) -> u32 {
    let mut b = [0u8; 4];
    f.read_exact_at(&mut b, off).expect("read");
    u32::from_le_bytes(b)
}

fn name_at(f: &File, slot: u64) -> Vec<u8> {
    let mut b = [0u8; NAME_LEN];
    f.read_exact_at(&mut b, 64 * (slot + 1)).expect("read");
    b.to_vec()
}

fn padded(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.resize(NAME_LEN, 0);
    v
}

#[test]
fn in_memory_counts() {
    let page = MetricsPage::in_memory();
    let m = TestMetrics::register(&page).expect("register");
    m.alpha.inc(1);
    m.alpha.inc(2);
    m.beta_bytes.inc(4096);
    assert_eq!(m.alpha.get(), 3);
    assert_eq!(
        page.snapshot(),
        vec![("alpha".to_string(), 3), ("beta_bytes".to_string(), 4096)]
    );
    assert_eq!(TestMetrics::NAMES, &["alpha", "beta_bytes"]);
}

#[test]
fn shared_page_has_the_documented_layout() {
    let f = memfd(PAGE_SIZE as u64);
    let page = MetricsPage::from_fd(inherited(&f)).expect("attach");
    let m = TestMetrics::register(&page).expect("register");
    m.alpha.inc(7);
    m.beta_bytes.inc(1 << 40);

    let mut magic = [0u8; 8];
    f.read_exact_at(&mut magic, 0).expect("read");
    assert_eq!(&magic, b"SKFMETR1");
    assert_eq!(u32_at(&f, 8), 1);
    assert_eq!(u32_at(&f, 12), 2);
    assert_eq!(name_at(&f, 0), padded("alpha"));
    assert_eq!(u64_at(&f, 64 + 56), 7);
    assert_eq!(name_at(&f, 1), padded("beta_bytes"));
    assert_eq!(u64_at(&f, 128 + 56), 1 << 40);
    assert_eq!(name_at(&f, 2), vec![0u8; NAME_LEN]);
}

#[test]
fn restarted_process_continues_the_counts() {
    let f = memfd(PAGE_SIZE as u64);
    let first = TestMetrics::register(&MetricsPage::from_fd(inherited(&f)).expect("attach"))
        .expect("register");
    first.alpha.inc(5);
    first.beta_bytes.inc(100);

    // The restarted (or upgraded) process: same names, values kept, no duplicate slots.
    let page = MetricsPage::from_fd(inherited(&f)).expect("re-attach");
    let second = TestMetrics::register(&page).expect("register again");
    assert_eq!(second.alpha.get(), 5);
    second.alpha.inc(1);
    assert_eq!(first.alpha.get(), 6, "both processes count into one slot");
    // A newer version with one more counter appends it.
    let gamma = page.counter("gamma").expect("new counter");
    gamma.inc(1);
    assert_eq!(u32_at(&f, 12), 3);
    assert_eq!(
        page.snapshot(),
        vec![
            ("alpha".to_string(), 6),
            ("beta_bytes".to_string(), 100),
            ("gamma".to_string(), 1),
        ]
    );
}

#[test]
fn bad_fds_are_refused_naming_the_option() {
    let err = MetricsPage::from_fd(1).expect_err("stdout");
    assert!(matches!(err, MetricsError::StdStream(1)), "{err}");

    let err = MetricsPage::from_fd(65_000).expect_err("closed");
    assert!(matches!(err, MetricsError::NotOpen(65_000, _)), "{err}");
    assert!(err.to_string().contains("--metrics-fd 65000"), "{err}");

    let small = memfd(100);
    let err = MetricsPage::from_fd(inherited(&small)).expect_err("size");
    assert!(
        matches!(err, MetricsError::WrongSize { size: 100, .. }),
        "{err}"
    );

    let tmp = TempFile::new().expect("temp file");
    tmp.as_file().set_len(PAGE_SIZE as u64).expect("size");
    let err = MetricsPage::from_fd(inherited(tmp.as_file())).expect_err("not memfd");
    assert!(matches!(err, MetricsError::NotMemfd(..)), "{err}");

    // Published (count 2) but not a skiff page.
    let junk = memfd(PAGE_SIZE as u64);
    junk.write_all_at(b"NOTSKIFF", 0).expect("write");
    junk.write_all_at(&2u32.to_le_bytes(), 12).expect("write");
    let err = MetricsPage::from_fd(inherited(&junk)).expect_err("bad magic");
    assert!(
        matches!(err, MetricsError::BadHeader { count: 2, .. }),
        "{err}"
    );
    // Right magic, unknown version.
    junk.write_all_at(b"SKFMETR1", 0).expect("write");
    junk.write_all_at(&2u32.to_le_bytes(), 8).expect("write");
    let err = MetricsPage::from_fd(inherited(&junk)).expect_err("bad version");
    assert!(
        matches!(err, MetricsError::BadHeader { version: 2, .. }),
        "{err}"
    );
}

#[test]
fn names_and_capacity_are_checked() {
    let page = MetricsPage::in_memory();
    for bad in ["", "Upper", "has-dash", "sp ace", "é"] {
        assert!(
            matches!(page.counter(bad), Err(MetricsError::BadName(_))),
            "{bad:?}"
        );
    }
    let long: &'static str = Box::leak("x".repeat(NAME_LEN + 1).into_boxed_str());
    assert!(matches!(page.counter(long), Err(MetricsError::BadName(_))));
    let full: &'static str = Box::leak("y".repeat(NAME_LEN).into_boxed_str());
    page.counter(full).expect("56-byte name fits");

    for i in 1..MAX_SLOTS {
        let name: &'static str = Box::leak(format!("c{i}").into_boxed_str());
        page.counter(name).expect("slot");
    }
    assert!(matches!(
        page.counter("one_too_many"),
        Err(MetricsError::Full(_))
    ));
    // Existing names are still found on a full page.
    page.counter("c1").expect("existing");
    assert_eq!(page.snapshot().len(), MAX_SLOTS);
}
