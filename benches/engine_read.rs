//! Sequential read throughput of one qcow2 image through the engine,
//! written out as raw like `qemu-img convert -O raw` does:
//! `cargo bench --bench engine_read -- IMAGE OUTPUT [REQUEST_BYTES [WORKERS]]`.
//! Workers take consecutive requests in turn, as `qemu-img convert` keeps
//! several requests in flight (`-m`, 8 by default).
//! `contrib/bench-engine.sh` runs it beside `qemu-img convert`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use chainfs::format::OpenOptions;
use chainfs::format::Qcow2;
use chainfs::storage::{FileStorage, Storage};

fn fail(what: &str, err: impl std::fmt::Display) -> ! {
    eprintln!("{what}: {err}");
    std::process::exit(1);
}

fn open(path: &str) -> Qcow2 {
    let storage: Arc<dyn Storage> = match FileStorage::open(path.as_ref(), false) {
        Ok(storage) => Arc::new(storage),
        Err(err) => fail(path, err),
    };
    let no_files = |name: &str, _: bool| -> std::io::Result<Arc<dyn Storage>> {
        Err(std::io::Error::other(format!(
            "no data file support here: {name}"
        )))
    };
    Qcow2::open(storage, &OpenOptions::default(), &no_files).unwrap_or_else(|err| fail(path, err))
}

/// Copies requests until none is left.
fn worker(image: &Qcow2, out: &File, next: &AtomicU64, request: u64) {
    let size = image.virtual_size();
    let mut buf = vec![0u8; request as usize];
    loop {
        let offset = next.fetch_add(request, Ordering::Relaxed);
        if offset >= size {
            return;
        }
        let n = (size - offset).min(request) as usize;
        if let Err(err) = image.read(offset, &mut buf[..n]) {
            fail(&format!("read at {offset}"), err);
        }
        if let Err(err) = out.write_all_at(&buf[..n], offset) {
            fail(&format!("write at {offset}"), err);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let (Some(path), Some(output)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: engine_read IMAGE OUTPUT [REQUEST_BYTES [WORKERS]]");
        std::process::exit(2);
    };
    let request: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2 << 20);
    let workers: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(4);
    let out = File::create(output).unwrap_or_else(|err| fail(output, err));
    let image = open(path);
    let size = image.virtual_size();
    let next = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| worker(&image, &out, &next, request));
        }
    });
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{:.1} MiB/s ({size} bytes in {secs:.3} s, {workers} workers, {request}-byte requests)",
        size as f64 / secs / (1 << 20) as f64
    );
}
