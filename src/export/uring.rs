//! Reads and writes of an exported image submitted with io_uring from the
//! connection's own task: no thread hand-off per request. Completions are
//! signalled on an eventfd the task waits on with the rest of its events
//! (socket readable, socket writable), like qemu-nbd's Linux AIO loop.
//!
//! Each operation owns its buffer until the kernel has finished with it;
//! dropping a `Ring` waits for the operations still in flight, so a buffer is
//! never freed while the kernel may still write into it.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use io_uring::{opcode, types, IoUring};
use tokio::io::unix::AsyncFd;

use super::image::{AlignedBuf, Image};

struct Op<T> {
    tag: T,
    buf: AlignedBuf,
    offset: u64,
    /// Bytes already transferred (a short read or write is resubmitted).
    done: usize,
    write: bool,
    fua: bool,
}

/// A finished operation: its tag, its buffer back, and how it ended.
pub(crate) struct Completion<T> {
    pub tag: T,
    pub buf: AlignedBuf,
    pub result: io::Result<()>,
}

pub(crate) struct Ring<T> {
    ring: IoUring,
    event: AsyncFd<OwnedFd>,
    image: Arc<Image>,
    ops: Vec<Option<Op<T>>>,
    free: Vec<usize>,
    /// Operations pushed and not yet completed.
    pending: usize,
}

impl<T> Ring<T> {
    /// A ring for `entries` operations at once on `image`. Fails where the
    /// kernel has no io_uring or forbids it (sysctl, seccomp): the caller
    /// then uses the blocking pool.
    pub fn new(image: Arc<Image>, entries: usize) -> io::Result<Ring<T>> {
        let entries = entries.clamp(1, 4096);
        let size = entries.next_power_of_two() as u32;
        // Cooperative task running: a completion does not interrupt the
        // submitting thread with an IPI (costly in a VM) but is posted at its
        // next entry into the kernel, or when it sleeps, at once; the
        // connection makes a system call for nearly every event anyway.
        // Kernels before 5.19 refuse the flags: the plain ring then.
        let ring = IoUring::builder().setup_coop_taskrun().setup_taskrun_flag().build(size).or_else(|_| IoUring::new(size))?;
        let fd = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK)?;
        ring.submitter().register_eventfd(fd.as_raw_fd())?;
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open (and the
        // same descriptor) until the AsyncFd is dropped.
        let event = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.map_err(io::Error::from)?;
        Ok(Ring { ring, event, image, ops: (0..entries).map(|_| None).collect(), free: (0..entries).rev().collect(), pending: 0 })
    }

    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Queue a read of `buf.len()` bytes at `offset` (submitted by `submit`).
    pub fn read(&mut self, tag: T, offset: u64, buf: AlignedBuf) -> Result<(), (T, AlignedBuf)> {
        self.start(Op { tag, buf, offset, done: 0, write: false, fua: false })
    }

    /// Queue a write of `buf` at `offset`; `fua`: durable before it completes.
    pub fn write(&mut self, tag: T, offset: u64, buf: AlignedBuf, fua: bool) -> Result<(), (T, AlignedBuf)> {
        self.start(Op { tag, buf, offset, done: 0, write: true, fua })
    }

    fn start(&mut self, op: Op<T>) -> Result<(), (T, AlignedBuf)> {
        let Some(slot) = self.free.pop() else {
            return Err((op.tag, op.buf));
        };
        self.ops[slot] = Some(op);
        self.pending += 1;
        self.push(slot);
        Ok(())
    }

    fn push(&mut self, slot: usize) {
        let op = self.ops[slot].as_mut().expect("a started operation");
        let rest = &mut op.buf[op.done..];
        let (ptr, len) = (rest.as_mut_ptr(), rest.len() as u32);
        let offset = op.offset + op.done as u64;
        let fd = types::Fd(self.image.file_for(offset, rest.len(), ptr as usize).as_raw_fd());
        let entry = if op.write {
            let flags = if op.fua { libc::RWF_DSYNC } else { 0 };
            opcode::Write::new(fd, ptr, len).offset(offset).rw_flags(flags).build()
        } else {
            opcode::Read::new(fd, ptr, len).offset(offset).build()
        }
        .user_data(slot as u64);
        loop {
            // SAFETY: the buffer lives in `self.ops[slot]` until its
            // completion is reaped (or `drop` has waited for it).
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return;
            }
            // The queue is full (it holds as many entries as there are
            // slots, so only resubmissions get here): make room.
            let _ = self.ring.submit();
        }
    }

    /// Hand what was queued to the kernel, and have it post completions
    /// still waiting for this thread (`taskrun`).
    pub fn submit(&mut self) -> io::Result<()> {
        let sq = self.ring.submission();
        let (queued, unposted) = (!sq.is_empty(), sq.taskrun());
        drop(sq);
        if queued || unposted {
            self.ring.submit()?;
        }
        Ok(())
    }

    /// Wait until some operation may have completed.
    pub async fn ready(&self) -> io::Result<()> {
        loop {
            let mut guard = self.event.readable().await?;
            let mut count = [0u8; 8];
            match guard.try_io(|fd| rustix::io::read(fd.get_ref(), &mut count).map_err(io::Error::from)) {
                Ok(_) => return Ok(()),
                Err(_would_block) => continue,
            }
        }
    }

    /// Collect finished operations into `out`; resubmit short ones.
    pub fn reap(&mut self, out: &mut Vec<Completion<T>>) {
        let finished: Vec<(usize, i32)> = self.ring.completion().map(|c| (c.user_data() as usize, c.result())).collect();
        for (slot, result) in finished {
            let op = self.ops[slot].as_mut().expect("a completion for a started operation");
            let want = op.buf.len() - op.done;
            let outcome = match result {
                n if n > 0 && (n as usize) < want => {
                    op.done += n as usize;
                    None
                }
                n if n >= 0 && n as usize == want => Some(Ok(())),
                // Reads past the end of the file: zeroes.
                0 if !op.write => {
                    op.buf[op.done..].fill(0);
                    Some(Ok(()))
                }
                0 => Some(Err(io::Error::from(io::ErrorKind::WriteZero))),
                n if n == -libc::EINTR || n == -libc::EAGAIN => None,
                n => Some(Err(io::Error::from_raw_os_error(-n))),
            };
            match outcome {
                // Not finished: submit the rest.
                None => self.push(slot),
                Some(result) => {
                    let op = self.ops[slot].take().expect("a started operation");
                    self.free.push(slot);
                    self.pending -= 1;
                    out.push(Completion { tag: op.tag, buf: op.buf, result });
                }
            }
        }
        let _ = self.submit();
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        // The kernel may still be filling or reading buffers: wait for every
        // operation in flight before they are freed.
        let mut sink = Vec::new();
        while self.pending > 0 {
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            self.reap(&mut sink);
            sink.clear();
        }
        if self.pending > 0 {
            // Could not wait: never free memory the kernel may touch.
            for op in self.ops.drain(..).flatten() {
                std::mem::forget(op.buf);
            }
        }
    }
}
