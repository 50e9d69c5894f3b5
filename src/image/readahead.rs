//! Reading a stream ahead on a thread of its own: the producer thread reads the inner
//! stream (for a layer: reads the blob, decompresses it and hashes it for its diff id) in
//! chunks of [`CHUNK`] bytes and hands them over a bounded channel, so the thread that
//! consumes the stream (applying the layer) does none of that work.
//!
//! A read error of the inner stream reaches the consumer as it is (same kind and message),
//! after the data read before it; when the consumer goes away, the producer stops at its
//! next chunk.

use std::{
    io::{self, Read},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{self, Receiver, SyncSender},
    },
    thread::{Scope, ScopedJoinHandle},
};

/// Bytes the producer reads per chunk.
pub const CHUNK: usize = 1 << 20;
/// Chunks read ahead of the consumer, at most (plus one being read and one being consumed).
const DEPTH: usize = 4;

/// A chunk read by the producer: a buffer and how many of its bytes are data, or the error
/// that ended the stream.
type Chunk = io::Result<(Vec<u8>, usize)>;

/// The consuming end: reads what the producer thread read from the inner stream.
pub struct ReadAhead<'scope, R> {
    chunks: Receiver<Chunk>,
    /// Spent buffers going back to the producer, so that it does not allocate (and fault
    /// in) a fresh megabyte per chunk.
    spent: SyncSender<Vec<u8>>,
    chunk: Vec<u8>,
    len: usize,
    pos: usize,
    producer: ScopedJoinHandle<'scope, R>,
    received: &'scope AtomicU64,
}

/// Starts reading `inner` ahead on a thread of `scope`; `received` counts the bytes the
/// consumer took delivery of (a chunk at a time), for other threads to watch.
pub fn spawn<'scope, R: Read + Send + 'scope>(
    scope: &'scope Scope<'scope, '_>,
    inner: R,
    received: &'scope AtomicU64,
) -> ReadAhead<'scope, R> {
    let (tx, chunks) = mpsc::sync_channel::<Chunk>(DEPTH);
    let (spent, free) = mpsc::sync_channel::<Vec<u8>>(DEPTH + 2);
    let producer = scope.spawn(move || produce(inner, &tx, &free));
    ReadAhead {
        chunks,
        spent,
        chunk: Vec::new(),
        len: 0,
        pos: 0,
        producer,
        received,
    }
}

/// The producer: reads `inner` to its end (or first error) in full chunks; returns it when
/// done or when the consumer is gone.
fn produce<R: Read>(mut inner: R, tx: &SyncSender<Chunk>, free: &Receiver<Vec<u8>>) -> R {
    loop {
        let mut buf = free.try_recv().unwrap_or_else(|_| vec![0u8; CHUNK]);
        let mut n = 0;
        let mut failed = None;
        while n < buf.len() {
            match inner.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let end = n < buf.len();
        if n > 0 && tx.send(Ok((buf, n))).is_err() {
            return inner;
        }
        if let Some(e) = failed {
            let _ = tx.send(Err(e));
            return inner;
        }
        if end {
            return inner;
        }
    }
}

impl<R> ReadAhead<'_, R> {
    /// Reads what is left (the consumer may stop before the stream's end) and waits for
    /// the producer. Returns the inner stream, read to its end unless the result is an
    /// error: the first read error of the inner stream not yet returned by `read`.
    pub fn finish(mut self) -> (R, io::Result<u64>) {
        let drained = io::copy(&mut self, &mut io::sink());
        drop(self.chunks);
        let inner = match self.producer.join() {
            Ok(inner) => inner,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        (inner, drained)
    }
}

impl<R> Read for ReadAhead<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.len {
            if self.chunk.capacity() > 0 {
                let _ = self.spent.try_send(std::mem::take(&mut self.chunk));
            }
            match self.chunks.recv() {
                Ok(Ok((chunk, len))) => {
                    self.received.fetch_add(len as u64, Ordering::Relaxed);
                    self.chunk = chunk;
                    self.len = len;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                // The producer is done: the end of the stream.
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.len - self.pos);
        out[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gives `data` in reads of varying sizes, then fails with `fail` if given.
    struct Source {
        data: Vec<u8>,
        pos: usize,
        step: usize,
        fail: Option<&'static str>,
    }

    impl Read for Source {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.pos == self.data.len() {
                return match self.fail {
                    Some(m) => Err(io::Error::new(io::ErrorKind::InvalidData, m)),
                    None => Ok(0),
                };
            }
            self.step = self.step * 7 % 65_537 + 1;
            let n = buf.len().min(self.step).min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    fn source(len: usize, fail: Option<&'static str>) -> Source {
        Source {
            data: (0..len).map(|i| (i * 31 % 251) as u8).collect(),
            pos: 0,
            step: 1,
            fail,
        }
    }

    #[test]
    fn passes_every_byte_in_order() {
        for len in [0, 1, CHUNK - 1, CHUNK, 3 * CHUNK + 12_345] {
            let want = source(len, None).data;
            let received = AtomicU64::new(0);
            std::thread::scope(|s| {
                let mut r = spawn(s, source(len, None), &received);
                let mut got = Vec::new();
                let mut buf = vec![0u8; 1000];
                loop {
                    let n = r.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                assert_eq!(got, want, "{len}");
                let (inner, rest) = r.finish();
                assert_eq!(rest.unwrap(), 0);
                assert_eq!(inner.pos, len);
                assert_eq!(received.load(Ordering::Relaxed), len as u64);
            });
        }
    }

    #[test]
    fn an_error_arrives_after_the_data_before_it() {
        let len = 2 * CHUNK + 10;
        let received = AtomicU64::new(0);
        std::thread::scope(|s| {
            let mut r = spawn(s, source(len, Some("corrupt deflate stream")), &received);
            let mut got = Vec::new();
            let e = r.read_to_end(&mut got).unwrap_err();
            assert_eq!(got.len(), len);
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert_eq!(e.to_string(), "corrupt deflate stream");
            let (_, rest) = r.finish();
            assert_eq!(rest.unwrap(), 0, "the error is returned once");
        });
        let received = AtomicU64::new(0);
        std::thread::scope(|s| {
            let mut r = spawn(s, source(len, Some("corrupt deflate stream")), &received);
            let mut head = [0u8; 10];
            r.read_exact(&mut head).unwrap();
            let (_, rest) = r.finish();
            assert_eq!(rest.unwrap_err().to_string(), "corrupt deflate stream");
        });
    }

    #[test]
    fn a_consumer_that_stops_early_stops_the_producer() {
        let received = AtomicU64::new(0);
        std::thread::scope(|s| {
            let mut r = spawn(s, source(64 * CHUNK, None), &received);
            let mut head = [0u8; 10];
            r.read_exact(&mut head).unwrap();
            drop(r);
        });
    }
}
