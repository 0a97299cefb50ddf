//! The durable store: per-core append-only segment files with group commit. Pure: the record
//! format ([`record`]), one core's log as a state machine ([`log`]), and recovery from every
//! segment ([`recovery`]). The engine does the file operations on each core's ring.

pub mod log;
pub mod record;
pub mod recovery;

#[cfg(test)]
mod tests;
