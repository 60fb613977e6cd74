//! Padding-free packing: budgets, boundaries, positions, labels and determinism.

use ftrt_models::data::{pack, pack_with_report, Example, IGNORE_INDEX};

fn example(len: usize, first_id: u32, label_from: usize) -> Example {
    let input_ids: Vec<u32> = (0..len as u32).map(|i| first_id + i).collect();
    let labels = input_ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            if i >= label_from {
                id as i32
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    Example { input_ids, labels }
}

#[test]
fn first_fit_by_hand() {
    // Budget 10; lengths 6, 5, 4, 3: 6 -> bin0, 5 -> bin1, 4 -> bin0 (6+4=10), 3 -> bin1 (5+3).
    let examples = [
        example(6, 100, 0),
        example(5, 200, 2),
        example(4, 300, 0),
        example(3, 400, 1),
    ];
    let batches = pack(&examples, 10);
    assert_eq!(batches.len(), 2);
    let b0 = &batches[0];
    assert_eq!(b0.cu_seqlens, vec![0, 6, 10]);
    assert_eq!(b0.position_ids, vec![0, 1, 2, 3, 4, 5, 0, 1, 2, 3]);
    assert_eq!(
        b0.input_ids,
        vec![100, 101, 102, 103, 104, 105, 300, 301, 302, 303]
    );
    // The first label of each sequence is ignored: nothing predicts across the boundary.
    assert_eq!(
        b0.labels,
        vec![-100, 101, 102, 103, 104, 105, -100, 301, 302, 303]
    );
    assert_eq!(b0.num_loss_tokens, 8);
    let b1 = &batches[1];
    assert_eq!(b1.cu_seqlens, vec![0, 5, 8]);
    assert_eq!(b1.position_ids, vec![0, 1, 2, 3, 4, 0, 1, 2]);
    assert_eq!(b1.labels, vec![-100, -100, 202, 203, 204, -100, 401, 402]);
    assert_eq!(b1.num_loss_tokens, 5);
}

#[test]
fn over_budget_sequences_are_cut_and_counted() {
    let examples = [example(25, 0, 0), example(3, 50, 0), example(0, 0, 0)];
    let packing = pack_with_report(&examples, 8);
    assert_eq!(packing.truncated, 1);
    assert_eq!(packing.batches.len(), 2);
    assert_eq!(packing.batches[0].input_ids, (0..8).collect::<Vec<u32>>());
    assert_eq!(packing.batches[1].cu_seqlens, vec![0, 3]);
}

#[test]
fn invariants_hold_on_many_sequences() {
    let examples: Vec<Example> = (0..300)
        .map(|i| example(1 + (i * 37 + 11) % 97, i as u32 * 1000, i % 5))
        .collect();
    let budget = 256;
    let batches = pack(&examples, budget);
    assert_eq!(batches, pack(&examples, budget));
    let total: usize = examples.iter().map(|e| e.input_ids.len()).sum();
    assert_eq!(
        batches.iter().map(|b| b.input_ids.len()).sum::<usize>(),
        total
    );
    let sequences: usize = batches.iter().map(|b| b.cu_seqlens.len() - 1).sum();
    assert_eq!(sequences, examples.len());
    for batch in &batches {
        let n = batch.input_ids.len();
        assert!(n <= budget);
        assert_eq!((batch.labels.len(), batch.position_ids.len()), (n, n));
        assert_eq!(*batch.cu_seqlens.last().unwrap() as usize, n);
        for window in batch.cu_seqlens.windows(2) {
            let (start, end) = (window[0] as usize, window[1] as usize);
            assert!(end > start);
            assert_eq!(
                batch.position_ids[start..end],
                (0..(end - start) as i32).collect::<Vec<_>>()[..]
            );
            assert_eq!(batch.labels[start], IGNORE_INDEX);
        }
        let loss = batch.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
        assert_eq!(batch.num_loss_tokens, loss);
    }
    // First-fit leaves little room: all but the last few bins are nearly full.
    let nearly_full = batches
        .iter()
        .filter(|b| b.input_ids.len() + 97 > budget)
        .count();
    assert!(
        nearly_full + 2 >= batches.len(),
        "{nearly_full} of {}",
        batches.len()
    );
}
