//! Sequential read throughput of one qcow2 image through the engine:
//! `cargo bench --bench engine_read -- IMAGE [REQUEST_BYTES]`.
//! `contrib/bench-engine.sh` runs it beside `qemu-img convert`.

use std::sync::Arc;
use std::time::Instant;

use chainfs::format::qcow2::Qcow2;
use chainfs::format::OpenOptions;
use chainfs::storage::{FileStorage, Storage};

fn main() {
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: engine_read IMAGE [REQUEST_BYTES]");
        std::process::exit(2);
    };
    let request: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1 << 20);
    let storage: Arc<dyn Storage> = match FileStorage::open(path.as_ref(), false) {
        Ok(storage) => Arc::new(storage),
        Err(err) => {
            eprintln!("{path}: {err}");
            std::process::exit(1);
        }
    };
    let no_files = |name: &str, _: bool| -> std::io::Result<Arc<dyn Storage>> {
        Err(std::io::Error::other(format!(
            "no data file support here: {name}"
        )))
    };
    let image = match Qcow2::open(storage, &OpenOptions::default(), &no_files) {
        Ok(image) => image,
        Err(err) => {
            eprintln!("{path}: {err}");
            std::process::exit(1);
        }
    };
    let size = image.virtual_size();
    let mut buf = vec![0u8; request];
    let start = Instant::now();
    let mut offset = 0;
    while offset < size {
        let n = (size - offset).min(request as u64) as usize;
        if let Err(err) = image.read(offset, &mut buf[..n]) {
            eprintln!("{path}: read at {offset}: {err}");
            std::process::exit(1);
        }
        offset += n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{:.1} MiB/s ({size} bytes in {secs:.3} s)",
        size as f64 / secs / (1 << 20) as f64
    );
}
