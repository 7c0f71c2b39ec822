"""Class definitions shared by every data set: the 19 Cityscapes training classes, their colours,
and the tables that map each data set's on-disk label ids to those train ids.

The tables are written once here from the official definitions (Cityscapes' `labels.py`, which
GTA5 shares, and SYNTHIA RAND-CITYSCAPES' class list) and used everywhere else.
"""
import numpy as np

IGNORE_INDEX = 255

# Cityscapes train ids 0..18, in the order of the paper's Table 1.
CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
NUM_CLASSES = len(CLASS_NAMES)

# Cityscapes colour palette, one RGB triple per train id.
PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

# "Thing" classes (countable objects): traffic light, traffic sign, person, rider, car, truck,
# bus, train, motorcycle, bicycle. The rest are "stuff". Used by the stuff / thing pair policy
# of CLUDA (Sec. 5.5) and by DAFormer's feature-distance loss.
THING_CLASSES = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)
STUFF_CLASSES = tuple(c for c in range(NUM_CLASSES) if c not in THING_CLASSES)

# Cityscapes label id -> train id (Cityscapes `labels.py`; GTA5 labels use the same ids).
# Ids not listed (0-6 void, 9 parking, 10 rail track, 14-16 guard rail / bridge / tunnel,
# 18 polegroup, 29 caravan, 30 trailer, -1 licence plate) map to IGNORE_INDEX.
CITYSCAPES_ID_TO_TRAINID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
    26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
# Train id -> Cityscapes label id (what the Cityscapes benchmark server takes).
TRAINID_TO_CITYSCAPES_ID = {t: i for i, t in CITYSCAPES_ID_TO_TRAINID.items()}

# SYNTHIA RAND-CITYSCAPES class id (first channel of GT/LABELS/*.png) -> Cityscapes train id.
# SYNTHIA ids: 1 sky, 2 building, 3 road, 4 sidewalk, 5 fence, 6 vegetation, 7 pole, 8 car,
# 9 traffic sign, 10 pedestrian, 11 bicycle, 12 motorcycle, 15 traffic light, 17 rider, 19 bus,
# 21 wall; 0 void, 13 parking-slot, 14 road-work, 16 terrain, 18 truck, 20 train and
# 22 lanemarking are ignored (SYNTHIA has no terrain, truck or train in the 16-class protocol).
SYNTHIA_ID_TO_TRAINID = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12, 8: 13,
    19: 15, 12: 17, 11: 18,
}

# Evaluation protocols: the train ids a protocol averages over.
PROTOCOLS = {
    19: tuple(range(NUM_CLASSES)),
    # SYNTHIA -> Cityscapes: no terrain, truck, train.
    16: tuple(c for c in range(NUM_CLASSES) if c not in (9, 14, 16)),
    # ... and additionally no wall, fence, pole.
    13: tuple(c for c in range(NUM_CLASSES) if c not in (3, 4, 5, 9, 14, 16)),
}


def lookup_table(mapping, size=65536):
    """A uint8 lookup table of `size` entries sending each id in `mapping` to its train id and
    every other id to IGNORE_INDEX (apply as `table[label_array]`)."""
    table = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for src, dst in mapping.items():
        table[src] = dst
    return table


def colorize(label):
    """(H, W) integer train ids -> (H, W, 3) uint8 RGB with the Cityscapes palette; ignored and
    unknown ids are black."""
    label = np.asarray(label)
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:NUM_CLASSES] = np.asarray(PALETTE, dtype=np.uint8)
    out = np.zeros(label.shape + (3,), dtype=np.uint8)
    ok = (label >= 0) & (label < 256)
    out[ok] = lut[label[ok].astype(np.int64)]
    return out
