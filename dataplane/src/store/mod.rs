//! The durable store: per-core append-only segment files with group commit. Pure: the record
//! format ([`record`]), one core's log as a state machine ([`log`]), and recovery from every
//! segment ([`recovery`]). The engine opens the files at start (`crate::engine::store`) and
//! does the file operations of each core's log on that core's ring.

mod index;
pub mod log;
pub mod record;
pub mod recovery;

#[cfg(test)]
mod tests;
