//! Loaded models by name, the least recently used evicted beyond a capacity: a node serving
//! several device classes keeps the models it uses hot without holding every model ever named.

use std::collections::VecDeque;

use super::{Backend, InferenceError, Model, ModelSpec};

/// An LRU cache of models loaded on one backend.
pub struct ModelCache {
    capacity: usize,
    /// Most recently used last.
    models: VecDeque<Box<dyn Model>>,
    loads: u64,
}

impl ModelCache {
    /// A cache holding at most `capacity` (at least 1) models.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            models: VecDeque::new(),
            loads: 0,
        }
    }

    /// The model `spec` names, loaded on `backend` if it is not cached.
    pub fn get(
        &mut self,
        backend: &dyn Backend,
        spec: &ModelSpec,
    ) -> Result<&mut Box<dyn Model>, InferenceError> {
        if let Some(i) = self.models.iter().position(|m| m.name() == &*spec.name) {
            if let Some(m) = self.models.remove(i) {
                self.models.push_back(m);
            }
        } else {
            let model = backend.load(spec)?;
            self.loads += 1;
            tracing::info!(model = %spec.name, backend = backend.name(), "model loaded");
            if self.models.len() >= self.capacity {
                if let Some(old) = self.models.pop_front() {
                    tracing::info!(
                        model = old.name(),
                        backend = backend.name(),
                        "model evicted"
                    );
                }
            }
            self.models.push_back(model);
        }
        match self.models.back_mut() {
            Some(m) => Ok(m),
            None => unreachable!("a model was just pushed"),
        }
    }

    /// Names of the cached models, least recently used first.
    pub fn names(&self) -> Vec<String> {
        self.models.iter().map(|m| m.name().to_owned()).collect()
    }

    /// Models loaded so far (misses).
    pub fn loads(&self) -> u64 {
        self.loads
    }

    /// Drops every cached model (after a backend failure, so the next use reloads).
    pub fn clear(&mut self) {
        self.models.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    struct Named(String);
    impl Model for Named {
        fn name(&self) -> &str {
            &self.0
        }
        fn inputs(&self) -> usize {
            1
        }
        fn run(&mut self, _: &[f32], rows: usize, s: &mut Vec<f32>) -> Result<(), InferenceError> {
            s.extend(std::iter::repeat_n(0.0, rows));
            Ok(())
        }
    }
    struct Loader;
    impl Backend for Loader {
        fn name(&self) -> &'static str {
            "test"
        }
        fn load(&self, spec: &ModelSpec) -> Result<Box<dyn Model>, InferenceError> {
            Ok(Box::new(Named(spec.name.to_string())))
        }
    }
    fn spec(name: &str) -> ModelSpec {
        ModelSpec {
            name: Arc::from(name),
            onnx: super::super::ModelSource::Builtin(&[]),
            hef: None,
            inputs: 1,
        }
    }

    #[test]
    fn evicts_the_least_recently_used() {
        let mut c = ModelCache::new(2);
        c.get(&Loader, &spec("a")).unwrap();
        c.get(&Loader, &spec("b")).unwrap();
        c.get(&Loader, &spec("a")).unwrap(); // a is now the most recent
        c.get(&Loader, &spec("c")).unwrap(); // evicts b
        assert_eq!(c.names(), vec!["a", "c"]);
        assert_eq!(c.loads(), 3);
        c.get(&Loader, &spec("b")).unwrap(); // evicts a
        assert_eq!(c.names(), vec!["c", "b"]);
        assert_eq!(c.loads(), 4);
    }
}
