//! Arrays and their placeholders in a value tree.
//!
//! A payload refers to downloaded arrays by placeholders (`numpy.ndarray` objects whose data is
//! `{"type": "ref", "data": "T<k>"}`) anywhere in its tree: in a Shareable, a DXO's data map,
//! a list, a tuple, inside another FOBS object. These functions find them, replace arrays by
//! them (producer side) and put the downloaded arrays back (consumer side), visiting every
//! container kind a FOBS payload can hold.

use std::collections::{BTreeSet, HashMap};

use fedrun_core::{NdArray, Shareable, Value};
use fedrun_fobs::download_ref::{array_ref, array_ref_item};

/// Calls `f` on every value of the tree under `v` (containers first, then their children),
/// letting it replace the value; children of a replaced value are not visited.
fn walk_mut(v: &mut Value, f: &mut dyn FnMut(&mut Value) -> bool) {
    if f(v) {
        return;
    }
    match v {
        Value::Array(items) | Value::Tuple(items) | Value::Set(items) => {
            items.iter_mut().for_each(|i| walk_mut(i, f));
        }
        Value::Map(m) => {
            let pairs = std::mem::take(m).into_pairs();
            let mut out = fedrun_core::Map::with_capacity(pairs.len());
            for (k, mut val) in pairs {
                walk_mut(&mut val, f);
                out.insert(k, val);
            }
            *m = out;
        }
        Value::Shareable(s) => walk_shareable(s, f),
        Value::Tagged(t) => walk_mut(&mut t.data, f),
        _ => {}
    }
}

fn walk_shareable(s: &mut Shareable, f: &mut dyn FnMut(&mut Value) -> bool) {
    let keys: Vec<String> = s.iter().map(|(k, _)| k.clone()).collect();
    for k in keys {
        if let Some(v) = s.get_mut(&k) {
            walk_mut(v, f);
        }
    }
}

fn walk(v: &Value, f: &mut dyn FnMut(&Value)) {
    f(v);
    match v {
        Value::Array(items) | Value::Tuple(items) | Value::Set(items) => {
            items.iter().for_each(|i| walk(i, f));
        }
        Value::Map(m) => m.iter().for_each(|(_, val)| walk(val, f)),
        Value::Shareable(s) => s.iter().for_each(|(_, val)| walk(val, f)),
        Value::Tagged(t) => walk(&t.data, f),
        _ => {}
    }
}

/// The placeholder item ids (`T<k>`) in the tree, sorted.
///
/// # Example
/// ```
/// use fedrun_core::Value;
/// use fedrun_fobs::download_ref::array_ref;
/// use fedrun_engine::download::tree::ref_items;
///
/// let v = Value::Array(vec![array_ref(1), Value::from(3), array_ref(0)]);
/// assert_eq!(ref_items(&v).into_iter().collect::<Vec<_>>(), ["T0", "T1"]);
/// ```
pub fn ref_items(v: &Value) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    walk(v, &mut |x| {
        if let Some(id) = array_ref_item(x) {
            out.insert(id.to_owned());
        }
    });
    out
}

/// Replaces every placeholder with its array from `arrays`; returns the ids it found no array
/// for (an empty list when the tree is complete). An array used by several placeholders is
/// shared, not copied.
pub fn substitute(v: &mut Value, arrays: &HashMap<String, NdArray>) -> Vec<String> {
    let mut missing = Vec::new();
    walk_mut(v, &mut |x| {
        let Some(id) = array_ref_item(x) else {
            return false;
        };
        match arrays.get(id) {
            Some(a) => *x = Value::NdArray(a.clone()),
            None => missing.push(id.to_owned()),
        }
        true
    });
    missing
}

/// Replaces every array in a Shareable with a placeholder `T0`, `T1`, ... (in tree order) and
/// returns the arrays, the k-th being `T<k>`.
///
/// # Example
/// ```
/// use fedrun_core::{NdArray, Shareable, Value};
/// use fedrun_engine::download::tree::arrays_to_refs;
///
/// let mut s = Shareable::new();
/// s.insert("w", NdArray::from_f32(&[2], &[1.0, 2.0]).unwrap());
/// let arrays = arrays_to_refs(&mut s);
/// assert_eq!(arrays.len(), 1);
/// assert_eq!(fedrun_fobs::download_ref::array_ref_item(s.get("w").unwrap()), Some("T0"));
/// ```
pub fn arrays_to_refs(s: &mut Shareable) -> Vec<NdArray> {
    let mut arrays = Vec::new();
    walk_shareable(s, &mut |x| {
        if let Value::NdArray(a) = x {
            let index = arrays.len();
            arrays.push(a.clone());
            *x = array_ref(index);
            return true;
        }
        false
    });
    arrays
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn arr(x: f32) -> NdArray {
        NdArray::from_f32(&[1], &[x]).unwrap()
    }

    #[test]
    fn arrays_anywhere_in_the_tree_round_trip_through_placeholders() {
        let mut dxo_data = fedrun_core::Map::new();
        dxo_data.insert("a", arr(1.0));
        dxo_data.insert(
            "b",
            Value::Tuple(vec![Value::from(arr(2.0)), Value::from(7)]),
        );
        let mut s = Shareable::new();
        s.insert("DXO", Value::Map(dxo_data));
        s.insert("list", Value::Array(vec![Value::from(arr(3.0))]));
        let before = s.clone();

        let arrays = arrays_to_refs(&mut s);
        assert_eq!(arrays.len(), 3);
        let mut v = Value::from(s);
        assert_eq!(ref_items(&v).len(), 3);
        let table: HashMap<String, NdArray> = arrays
            .into_iter()
            .enumerate()
            .map(|(i, a)| (format!("T{i}"), a))
            .collect();
        assert!(substitute(&mut v, &table).is_empty());
        assert_eq!(v.as_shareable(), Some(&before));
    }

    #[test]
    fn a_placeholder_without_its_array_is_reported_missing() {
        let mut v = Value::Array(vec![array_ref(0), array_ref(5)]);
        let table = HashMap::from([("T0".to_owned(), arr(1.0))]);
        assert_eq!(substitute(&mut v, &table), vec!["T5".to_owned()]);
    }
}
