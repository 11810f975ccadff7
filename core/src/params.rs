//! A whole model as one contiguous `f32` buffer ([`Params`]) described by a [`Layout`] of named
//! segments.
//!
//! A segment is one tensor of the model (a layer's weight, its bias, a running statistic). Layers,
//! gradients, codecs, aggregation and the wire all address the same flat buffer through the same
//! layout, so moving a model between them never reshuffles memory.

use crate::CoreError;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;

/// Whether a segment is optimised or only carried along.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SegmentKind {
    /// Part of the trainable vector `x` that algorithms optimise.
    Trainable,
    /// A non-trainable buffer (running statistics, counters): never enters momentum or control variates.
    Buffer,
}

/// One named tensor inside the flat buffer.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Segment {
    /// Unique name, e.g. `conv1.weight`.
    pub name: String,
    /// Tensor shape; the element count is the product of the dimensions.
    pub shape: Vec<usize>,
    /// Index of the first element in the flat buffer.
    pub offset: usize,
    /// Trainable parameter or buffer.
    pub kind: SegmentKind,
}

impl Segment {
    /// Number of scalars in the segment.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True for a segment with no elements (never produced by [`LayoutBuilder`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The segment's range in the flat buffer.
    pub fn range(&self) -> Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// The ordered list of segments of a model, with their offsets and a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    segments: Vec<Segment>,
    len: usize,
    fingerprint: u64,
}

/// Builds a [`Layout`] segment by segment, assigning contiguous offsets.
#[derive(Debug, Default)]
pub struct LayoutBuilder {
    segments: Vec<Segment>,
    names: HashSet<String>,
    len: usize,
}

impl LayoutBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a segment; returns its range in the flat buffer.
    pub fn push(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        kind: SegmentKind,
    ) -> Result<Range<usize>, CoreError> {
        let name = name.into();
        let count = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let count = match count {
            Some(c) if c > 0 && !shape.is_empty() => c,
            _ => {
                return Err(CoreError::InvalidShape {
                    name,
                    shape: shape.to_vec(),
                });
            }
        };
        if !self.names.insert(name.clone()) {
            return Err(CoreError::DuplicateSegment(name));
        }
        let offset = self.len;
        self.len = offset.checked_add(count).ok_or_else(|| CoreError::InvalidShape {
            name: name.clone(),
            shape: shape.to_vec(),
        })?;
        self.segments.push(Segment {
            name,
            shape: shape.to_vec(),
            offset,
            kind,
        });
        Ok(offset..self.len)
    }

    /// Scalars in the segments pushed so far (the offset the next segment gets).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before any segment is pushed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Finishes the layout.
    pub fn build(self) -> Layout {
        let fingerprint = fingerprint(&self.segments);
        Layout {
            segments: self.segments,
            len: self.len,
            fingerprint,
        }
    }
}

fn fingerprint(segments: &[Segment]) -> u64 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for segment in segments {
        hasher.update(&(segment.name.len() as u64).to_le_bytes());
        hasher.update(segment.name.as_bytes());
        hasher.update(&(segment.shape.len() as u64).to_le_bytes());
        for &dim in &segment.shape {
            hasher.update(&(dim as u64).to_le_bytes());
        }
        hasher.update(&[match segment.kind {
            SegmentKind::Trainable => 0,
            SegmentKind::Buffer => 1,
        }]);
    }
    hasher.digest()
}

impl Layout {
    /// Total number of scalars (trainable and buffers).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a layout without segments.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The segments in buffer order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The segment with this name.
    pub fn segment(&self, name: &str) -> Result<&Segment, CoreError> {
        self.segments
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| CoreError::UnknownSegment(name.to_string()))
    }

    /// A 64-bit hash of names, shapes and kinds: two layouts with equal fingerprints describe the
    /// same model. Payloads carry it so a server rejects an update built for another model.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Number of trainable scalars (`d` in ALGORITHMS.md).
    pub fn num_trainable(&self) -> usize {
        self.segments
            .iter()
            .filter(|s| s.kind == SegmentKind::Trainable)
            .map(Segment::len)
            .sum()
    }

    /// Ranges of the trainable segments, in order.
    pub fn trainable_ranges(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        self.segments
            .iter()
            .filter(|s| s.kind == SegmentKind::Trainable)
            .map(Segment::range)
    }

    /// Fails unless `len` matches the layout.
    pub fn check_len(&self, len: usize) -> Result<(), CoreError> {
        if len == self.len {
            Ok(())
        } else {
            Err(CoreError::LengthMismatch {
                expected: self.len,
                actual: len,
            })
        }
    }
}

/// A model's values in one contiguous buffer, paired with the layout that names them.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    layout: Arc<Layout>,
    values: Vec<f32>,
}

impl Params {
    /// All zeros.
    pub fn zeros(layout: Arc<Layout>) -> Self {
        let values = vec![0.0; layout.len()];
        Self { layout, values }
    }

    /// Wraps a buffer; fails if its length does not match the layout.
    pub fn from_vec(layout: Arc<Layout>, values: Vec<f32>) -> Result<Self, CoreError> {
        layout.check_len(values.len())?;
        Ok(Self { layout, values })
    }

    /// The layout.
    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    /// The whole flat buffer.
    pub fn as_slice(&self) -> &[f32] {
        &self.values
    }

    /// The whole flat buffer, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// Gives the buffer back.
    pub fn into_vec(self) -> Vec<f32> {
        self.values
    }

    /// The values of one named segment.
    pub fn segment(&self, name: &str) -> Result<&[f32], CoreError> {
        let range = self.layout.segment(name)?.range();
        Ok(&self.values[range])
    }

    /// The values of one named segment, mutable.
    pub fn segment_mut(&mut self, name: &str) -> Result<&mut [f32], CoreError> {
        let range = self.layout.segment(name)?.range();
        Ok(&mut self.values[range])
    }

    /// Fails unless `other` has the same layout (by fingerprint).
    pub fn check_same_layout(&self, other: &Params) -> Result<(), CoreError> {
        let (expected, actual) = (self.layout.fingerprint(), other.layout.fingerprint());
        if expected == actual {
            Ok(())
        } else {
            Err(CoreError::LayoutMismatch { expected, actual })
        }
    }

    /// Copies every segment of `other` whose name and shape also appear in `self`; returns how many
    /// segments were copied. Moves weights between a whole model and its split head and tail.
    pub fn copy_matching_segments(&mut self, other: &Params) -> usize {
        let mut copied = 0;
        for segment in self.layout.segments() {
            if let Ok(source) = other.layout.segment(&segment.name) {
                if source.shape == segment.shape {
                    self.values[segment.range()].copy_from_slice(&other.values[source.range()]);
                    copied += 1;
                }
            }
        }
        copied
    }

    /// True when every value is finite.
    pub fn is_finite(&self) -> bool {
        self.values.iter().all(|v| v.is_finite())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn two_layer() -> Layout {
        let mut b = LayoutBuilder::new();
        b.push("fc.weight", &[3, 4], SegmentKind::Trainable).unwrap();
        b.push("fc.bias", &[4], SegmentKind::Trainable).unwrap();
        b.push("bn.running_mean", &[4], SegmentKind::Buffer).unwrap();
        b.build()
    }

    #[test]
    fn offsets_are_contiguous_and_in_order() {
        let layout = two_layer();
        let ranges: Vec<_> = layout.segments().iter().map(Segment::range).collect();
        assert_eq!(ranges, vec![0..12, 12..16, 16..20]);
        assert_eq!(layout.len(), 20);
        assert_eq!(layout.num_trainable(), 16);
        assert_eq!(layout.trainable_ranges().collect::<Vec<_>>(), vec![0..12, 12..16]);
    }

    #[test]
    fn duplicate_and_empty_segments_are_rejected() {
        let mut b = LayoutBuilder::new();
        b.push("w", &[2], SegmentKind::Trainable).unwrap();
        assert_eq!(
            b.push("w", &[3], SegmentKind::Trainable),
            Err(CoreError::DuplicateSegment("w".into()))
        );
        assert!(matches!(
            b.push("z", &[0, 3], SegmentKind::Trainable),
            Err(CoreError::InvalidShape { .. })
        ));
        assert!(matches!(
            b.push("s", &[], SegmentKind::Trainable),
            Err(CoreError::InvalidShape { .. })
        ));
        assert!(matches!(
            b.push("huge", &[usize::MAX, 2], SegmentKind::Trainable),
            Err(CoreError::InvalidShape { .. })
        ));
    }

    #[test]
    fn segments_are_views_into_the_one_buffer() {
        let layout = Arc::new(two_layer());
        let mut params = Params::zeros(layout.clone());
        params
            .segment_mut("fc.bias")
            .unwrap()
            .copy_from_slice(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(&params.as_slice()[12..16], &[1.0, 2.0, 3.0, 4.0]);
        assert!(params.segment("nope").is_err());
        assert!(Params::from_vec(layout, vec![0.0; 19]).is_err());
    }

    #[test]
    fn matching_segments_are_copied_by_name_and_shape() {
        let source = Params::from_vec(Arc::new(two_layer()), (0..20).map(|i| i as f32).collect()).unwrap();
        let mut b = LayoutBuilder::new();
        b.push("fc.bias", &[4], SegmentKind::Trainable).unwrap();
        b.push("fc.weight", &[2, 6], SegmentKind::Trainable).unwrap();
        b.push("extra", &[3], SegmentKind::Trainable).unwrap();
        let mut target = Params::zeros(Arc::new(b.build()));
        assert_eq!(target.copy_matching_segments(&source), 1);
        assert_eq!(target.segment("fc.bias").unwrap(), &[12.0, 13.0, 14.0, 15.0]);
        assert!(target.segment("fc.weight").unwrap().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn fingerprint_tells_layouts_apart() {
        let a = two_layer();
        let mut b = LayoutBuilder::new();
        b.push("fc.weight", &[4, 3], SegmentKind::Trainable).unwrap();
        b.push("fc.bias", &[4], SegmentKind::Trainable).unwrap();
        b.push("bn.running_mean", &[4], SegmentKind::Buffer).unwrap();
        let b = b.build();
        assert_eq!(a.len(), b.len());
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), two_layer().fingerprint());
        let pa = Params::zeros(Arc::new(a));
        let pb = Params::zeros(Arc::new(b));
        assert!(matches!(
            pa.check_same_layout(&pb),
            Err(CoreError::LayoutMismatch { .. })
        ));
    }

    #[test]
    fn layout_round_trips_through_serde() {
        let layout = two_layer();
        let json = serde_json::to_string(&layout).unwrap();
        let back: Layout = serde_json::from_str(&json).unwrap();
        assert_eq!(back, layout);
    }

    proptest! {
        #[test]
        fn any_set_of_shapes_tiles_the_buffer(shapes in prop::collection::vec(prop::collection::vec(1usize..6, 1..4), 1..10)) {
            let mut b = LayoutBuilder::new();
            for (i, shape) in shapes.iter().enumerate() {
                b.push(format!("s{i}"), shape, SegmentKind::Trainable).unwrap();
            }
            let layout = b.build();
            let mut next = 0;
            for s in layout.segments() {
                prop_assert_eq!(s.offset, next);
                next += s.len();
            }
            prop_assert_eq!(next, layout.len());
        }
    }
}
