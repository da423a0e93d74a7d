#![no_std]
// Lets service-agent name this crate as a build dependency; the programs live in main.rs.
