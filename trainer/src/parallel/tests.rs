use super::*;
use std::sync::Arc;
use std::time::Instant;
use tch::Device;

/// Runs `f(rank)` on `workers` threads and returns their results in rank order.
fn on_threads<T: Send + 'static>(
    workers: usize,
    f: impl Fn(usize) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = Arc::new(f);
    let handles: Vec<_> = (0..workers)
        .map(|rank| {
            let f = Arc::clone(&f);
            std::thread::spawn(move || f(rank))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn vector(rank: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7 + rank * 13) % 17) as f32 * 0.25 - 2.0)
        .collect()
}

#[test]
fn local_reducer_sums_identically_on_every_worker() {
    for (workers, n) in [(2, 10), (3, 1001), (4, 3)] {
        let reducer = Arc::new(LocalReducer::new(workers, Duration::from_secs(30)));
        let r = Arc::clone(&reducer);
        let results = on_threads(workers, move |rank| {
            let mut bucket = Tensor::from_slice(&vector(rank, n));
            r.all_reduce_sum(rank, &mut bucket).unwrap();
            Vec::<f32>::try_from(&bucket).unwrap()
        });
        let expected: Vec<f32> = (0..n)
            .map(|i| (0..workers).map(|w| vector(w, n)[i]).sum())
            .collect();
        for got in &results {
            assert_eq!(got, &results[0], "bit-identical on every worker");
        }
        for (g, e) in results[0].iter().zip(&expected) {
            assert!((g - e).abs() < 1e-5, "{g} vs {e}");
        }
    }
}

#[test]
fn gradients_travel_in_buckets_and_come_back_in_place() {
    let workers = 2;
    let reducer = Arc::new(LocalReducer::new(workers, Duration::from_secs(30)));
    for dtype in [GradDtype::Fp32, GradDtype::Bf16] {
        let r = Arc::clone(&reducer);
        let results = on_threads(workers, move |rank| {
            let mut grads: Vec<Tensor> = [vec![3, 4], vec![5], vec![2, 2, 2]]
                .iter()
                .enumerate()
                .map(|(i, shape)| {
                    Tensor::full(shape, (rank + i) as f64 * 0.5, (Kind::Float, Device::Cpu))
                })
                .collect();
            // 40 bytes per bucket: several buckets, one tensor larger than a bucket.
            all_reduce_gradients(r.as_ref(), rank, &mut grads, 40, dtype).unwrap();
            grads
        });
        for grads in &results {
            assert_eq!(grads[0].size(), vec![3, 4]);
            assert_eq!(grads[2].size(), vec![2, 2, 2]);
            assert_eq!(grads[0].kind(), Kind::Float);
            for (i, g) in grads.iter().enumerate() {
                // (0 + i) * 0.5 + (1 + i) * 0.5
                let expected = i as f64 + 0.5;
                let max = f64::try_from((g - expected).abs().max()).unwrap();
                assert!(max < 1e-6, "{dtype:?} tensor {i} off by {max}");
            }
        }
    }
}

#[test]
fn a_worker_that_never_arrives_is_named_within_the_timeout() {
    let reducer = LocalReducer::new(3, Duration::from_millis(300));
    let started = Instant::now();
    let mut bucket = Tensor::from_slice(&[1.0f32, 2.0]);
    let err = reducer
        .all_reduce_sum(0, &mut bucket)
        .unwrap_err()
        .to_string();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        err.contains("worker 1, 2 did not reach the gradient all-reduce"),
        "{err}"
    );
    // Poisoned: later calls fail at once with the same reason.
    let err2 = reducer
        .all_reduce_sum(1, &mut bucket)
        .unwrap_err()
        .to_string();
    assert_eq!(err, err2);
}

#[test]
fn abort_wakes_the_waiting_workers_with_the_reason() {
    let reducer = Arc::new(LocalReducer::new(2, Duration::from_secs(60)));
    let r = Arc::clone(&reducer);
    let waiter = std::thread::spawn(move || {
        let mut bucket = Tensor::from_slice(&[1.0f32]);
        r.all_reduce_sum(0, &mut bucket)
    });
    std::thread::sleep(Duration::from_millis(100));
    reducer.abort("data-parallel worker 1 panicked: boom".to_string());
    let started = Instant::now();
    let err = waiter.join().unwrap().unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(err.contains("worker 1 panicked: boom"), "{err}");
}

#[test]
fn mismatched_buckets_fail_on_every_worker() {
    let reducer = Arc::new(LocalReducer::new(2, Duration::from_secs(30)));
    let r = Arc::clone(&reducer);
    let results = on_threads(2, move |rank| {
        let mut bucket = Tensor::zeros([3 + rank as i64], (Kind::Float, Device::Cpu));
        r.all_reduce_sum(rank, &mut bucket)
            .map_err(|e| e.to_string())
    });
    for result in results {
        let err = result.unwrap_err();
        assert!(err.contains("disagree on a gradient bucket"), "{err}");
    }
}

#[test]
fn the_batch_is_split_over_workers_or_the_config_is_refused() {
    let cfg = ParallelConfig::default();
    let split = cfg.worker_batches(2, 16, 4).unwrap();
    assert_eq!(
        split,
        vec![
            WorkerBatch {
                micro_batch: 4,
                accumulation: 2
            };
            2
        ]
    );
    let mixed = ParallelConfig {
        micro_batch: vec![8, 4],
        accumulation: vec![1, 2],
        ..ParallelConfig::default()
    };
    assert_eq!(mixed.worker_batches(2, 16, 4).unwrap()[1].sequences(), 8);
    let err = mixed.worker_batches(2, 20, 4).unwrap_err().to_string();
    assert!(err.contains("adds up to 16 sequences"), "{err}");
    let err = cfg.worker_batches(3, 16, 4).unwrap_err().to_string();
    assert!(
        err.contains("does not split evenly into 3 workers"),
        "{err}"
    );
    let err = mixed.worker_batches(3, 16, 4).unwrap_err().to_string();
    assert!(
        err.contains("has 2 entries but there are 3 workers"),
        "{err}"
    );
}
