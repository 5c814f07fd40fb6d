//! Destination resolution: which local APICs a message targets, with a lookup map.
//! (Issue 3: being built.)
