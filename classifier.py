"""The C2I judge: a small CNN trained once on a dataset's real training images, then cached.

C2I class-consistency is the fraction of generated images it assigns to the class they were generated
for; its accuracy on the real test images (test_accuracy) is the ceiling of that number.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from data import atomic_write, cache_dir
from embeddings import accuracy


class SmallCNN(nn.Module):
    """Three stride-2 conv stages (32 -> 16 -> 8 -> 4 pixels) and a linear head. Strided convolutions
    instead of conv + max-pool keep it cheap: 3 epochs reach ~99.2% on MNIST in ~1.5 min at one thread (2-core CPU)."""

    def __init__(self, in_channels, num_classes, width=24):
        super().__init__()
        def stage(c_in, c_out, k):  # a k x k stride-2 convolution halves the image
            return [nn.Conv2d(c_in, c_out, k, stride=2, padding=k // 2), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.net = nn.Sequential(*stage(in_channels, width, 5), *stage(width, 2 * width, 3),
                                 *stage(2 * width, 4 * width, 3), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                                 nn.Dropout(0.2), nn.Linear(64 * width, num_classes))

    def forward(self, x):  # x (N, C, H, W) in [-1, 1]
        return self.net(x)


def train_classifier(train, test, num_classes, epochs=3, batch_size=128, seed=0, device='cpu'):
    """Adam, one-cycle learning rate, on train = (uint8 images, labels). -> (model, its accuracy on test)."""
    images, labels = train
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallCNN(images.shape[1], num_classes).to(device)
    batches = len(images) // batch_size  # per epoch, whole batches only
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * batches)
    threads = torch.get_num_threads()
    # Ops this small parallelise badly: on a shared 2-core CPU one thread trained 2.5x faster than two.
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():  # also when first needed inside a no_grad evaluation
            for _ in range(epochs):
                for idx in torch.randperm(len(images), generator=generator)[:batches * batch_size].split(batch_size):
                    loss = F.cross_entropy(model(data.to_unit_range(images[idx].to(device))), labels[idx].to(device))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval(), accuracy(classify(model, data.to_unit_range(test[0])), test[1], num_classes)[0]


@torch.no_grad()
def classify(classifier, images, batch_size=500):
    """images (N, C, H, W) float in [-1, 1] -> predicted class (N,) int64 on the CPU."""
    device = next(classifier.parameters()).device
    return torch.cat([classifier(images[s:s + batch_size].to(device).float()).argmax(1).cpu()
                      for s in range(0, len(images), batch_size)])


def load_classifier(dataset, data_dir, device='cpu', image_size=32):
    """The C2I judge for `dataset`, trained and cached on first use; `.test_accuracy`: on the real test split."""
    path = cache_dir() / f'classifier_{dataset}_{image_size}.pt'
    if path.is_file():
        saved = torch.load(path, map_location='cpu', weights_only=True)
    else:
        train, test = (data.load_dataset(dataset, split, data_dir, image_size) for split in ('train', 'test'))
        model, test_accuracy = train_classifier(train, test, data.num_classes(dataset), device=device)
        saved = {'state': {k: v.cpu() for k, v in model.state_dict().items()}, 'test_accuracy': test_accuracy}
        atomic_write(path, lambda f: torch.save(saved, f))
    model = SmallCNN(data.dataset_shape(dataset, image_size)[0], data.num_classes(dataset))
    model.load_state_dict(saved['state'])
    model.test_accuracy = saved['test_accuracy']
    return model.eval().requires_grad_(False).to(device)


def confusion_matrix(true, predicted, num_classes):
    """counts[i][j] = #{n : true_n = i, predicted_n = j}, a K x K list of lists (JSON-ready)."""
    pairs = torch.as_tensor(true).long().cpu() * num_classes + torch.as_tensor(predicted).long().cpu()
    return torch.bincount(pairs, minlength=num_classes ** 2).view(num_classes, num_classes).tolist()


def c2i_class_accuracy(classifier, images, requested_labels):
    """C2I class-consistency, overall and per class, and the confusion matrix (rows: requested, columns: predicted)."""
    num_classes = classifier.net[-1].out_features
    predicted = classify(classifier, images)
    acc, per_class = accuracy(predicted, requested_labels, num_classes)
    return {'c2i_class_acc': acc, 'per_class_c2i_class_acc': per_class,
            'c2i_confusion': confusion_matrix(requested_labels, predicted, num_classes)}
