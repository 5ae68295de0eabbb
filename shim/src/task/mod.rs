//! The tasks of one shim: each container's VM runs in a monitor (the same
//! one `krun-oci create` forks) on a thread of this process; the Task API
//! calls become monitor requests, and what happens becomes containerd
//! events.
//!
//! One file per RPC family, each an `impl Tasks` block: [`create`],
//! [`start`], [`exec`], [`delete`], [`control`] (kill, pause, resize,
//! close_io, update) and [`query`] (state, wait, pids, stats). What a task
//! is and the table of them are in [`tasks`]; the rules that change a
//! task's state, free of any VM, in [`state`]; its FIFOs in [`stdio`].

mod control;
mod create;
mod delete;
mod exec;
mod query;
mod start;
mod state;
mod stdio;
mod tasks;

pub use tasks::Tasks;
