//! The OpenWhisk Docker-action runtime (`limitless serve`): the action protocol, the HTTP
//! server, and the self-invocation through the REST API that hands a chain from one
//! activation to the next.

pub mod invoke;
pub mod protocol;
pub mod server;
