//! Bounds on the descriptor chains the backends walk.
//!
//! virtio-queue ends a chain after a queue size of descriptors, or, once it follows an
//! indirect descriptor, after the table's length (up to 65535 more); and at the descriptor
//! that takes the chain past 4 GiB. The specification allows no chain longer than the
//! queue size (2.7.5.3.1), and skiff advertises at most 256 data segments per request, so
//! every walk takes at most [`MAX_DESCRIPTORS`] descriptors of a chain, and a chain with
//! more is refused as a whole (taking the first ones would mistake a data buffer for the
//! request's status byte).

use virtio_queue::desc::split::Descriptor;

/// Most descriptors a chain may have (also the most iovecs one readv/writev takes).
pub const MAX_DESCRIPTORS: usize = 1024;

/// Why a descriptor chain is refused.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The chain has more than [`MAX_DESCRIPTORS`] descriptors.
    #[error("descriptor chain longer than {MAX_DESCRIPTORS} descriptors")]
    TooLong,
    /// The chain's buffers add up to 4 GiB or more.
    #[error("descriptor chain of 4 GiB or more")]
    TooLarge,
}

/// The descriptors `descs` yields, unless there are more than [`MAX_DESCRIPTORS`] (then
/// no more than one past the bound are read).
pub fn collect(descs: impl Iterator<Item = Descriptor>) -> Result<Vec<Descriptor>, ChainError> {
    let mut out = Vec::new();
    for d in descs {
        if out.len() == MAX_DESCRIPTORS {
            return Err(ChainError::TooLong);
        }
        out.push(d);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_are_bounded() {
        let d = Descriptor::new(0x1000, 16, 0, 0);
        assert_eq!(
            collect(std::iter::repeat_n(d, MAX_DESCRIPTORS))
                .unwrap()
                .len(),
            MAX_DESCRIPTORS
        );
        let mut taken = 0;
        let long = std::iter::repeat(d).inspect(|_| taken += 1);
        assert!(matches!(collect(long), Err(ChainError::TooLong)));
        assert_eq!(taken, MAX_DESCRIPTORS + 1, "read past the bound");
    }
}
