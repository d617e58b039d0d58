"""The Fashion-MNIST-LT bench's paired comparisons: each setting of a row against the row without it."""
from experiments.bench.fmnist_lt import one_setting_apart


def test_each_setting_is_paired_with_the_row_without_it_and_the_same_posthoc_correction():
    row = "sequential:gan_pretrain_steps=20000+class_prior=real+posthoc=logit_adjust+posthoc_tau=2"
    assert one_setting_apart([row, "vanilla", "vanilla:posthoc=crt"]) == [
        (row, "sequential:class_prior=real+posthoc=logit_adjust+posthoc_tau=2", "gan_pretrain_steps=20000"),
        (row, "sequential:gan_pretrain_steps=20000+posthoc=logit_adjust+posthoc_tau=2", "class_prior=real"),
    ]
    assert one_setting_apart(["end2end:allocator=learned"]) == [("end2end:allocator=learned", "end2end", "allocator=learned")]


def test_a_row_whose_w2_learns_from_no_generated_image_is_non_generating():
    from experiments.bench.fmnist_lt import non_generating
    assert non_generating("vanilla:loss=balanced_softmax")
    assert non_generating("sequential:loss=balanced_softmax+w2_init=w1+lambda_gen=0")
    assert not non_generating("sequential:loss=balanced_softmax+w2_init=w1+lambda_gen=0.5")
    assert not non_generating("sequential_real") and not non_generating("sequential:posthoc=crt")
