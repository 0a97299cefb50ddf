//! agent client
