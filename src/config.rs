//! The network's configuration: every key of the oracle's DEFAULT_CONFIG, with its defaults.
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Downsample {
    Stride,
    Maxpool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Head {
    Distance,
    Sigmoid,
}

// Far beyond any DeepIS variant (published: widths to 1024, 2 blocks, kernels 7), and small
// enough that no tensor size of the model overflows; memory is checked against the budget
// where weights are made (`weights::check_param_budget`).
const MAX_WIDTH: usize = 1 << 16;
const MAX_BLOCKS: usize = 64;
const MAX_GCN_KERNEL: usize = 255;

/// Mirrors `DEFAULT_CONFIG` of `deepis_ref.py`. Unknown keys are an error; missing keys take defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub widths: [usize; 5],
    pub trans_feature: usize,
    pub blocks: [usize; 4],
    pub gcn_kernels: [usize; 4],
    pub downsample: Downsample,
    pub head: Head,
    pub out_channels: usize,
    pub input_offset: f64,
    pub input_scale: f64,
    pub bn_eps: f64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            widths: [64, 128, 256, 512, 1024],
            trans_feature: 64,
            blocks: [2, 2, 2, 2],
            gcn_kernels: [7, 7, 7, 3],
            downsample: Downsample::Stride,
            head: Head::Distance,
            out_channels: 1,
            input_offset: 0.0,
            input_scale: 1.0,
            bn_eps: 1e-5,
        }
    }
}

impl Config {
    /// The README variant: widths 32..512.
    pub fn readme_widths() -> Self {
        Config { widths: [32, 64, 128, 256, 512], ..Config::default() }
    }

    pub fn from_json(s: &str) -> Result<Self> {
        let c: Config = serde_json::from_str(s).map_err(|e| Error::Config(format!("{e} in {s}")))?;
        c.validate()?;
        Ok(c)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("config serialises")
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.widths.iter().any(|&w| !(2..=MAX_WIDTH).contains(&w) || w % 2 != 0) {
            return bad(format!("widths must be even, from 2 to {MAX_WIDTH}, got {:?}", self.widths));
        }
        if !(2..=MAX_WIDTH).contains(&self.trans_feature) || !self.trans_feature.is_multiple_of(2) {
            return bad(format!("trans_feature must be even, from 2 to {MAX_WIDTH}, got {}", self.trans_feature));
        }
        if self.blocks.iter().any(|&b| !(1..=MAX_BLOCKS).contains(&b)) {
            return bad(format!("blocks must be from 1 to {MAX_BLOCKS} per stage, got {:?}", self.blocks));
        }
        if self.gcn_kernels.iter().any(|&k| k == 0 || k % 2 == 0 || k > MAX_GCN_KERNEL) {
            return bad(format!("gcn_kernels must be odd, at most {MAX_GCN_KERNEL}, got {:?}", self.gcn_kernels));
        }
        if self.head == Head::Sigmoid && !(1..=MAX_WIDTH).contains(&self.out_channels) {
            return bad(format!("out_channels must be from 1 to {MAX_WIDTH}, got {}", self.out_channels));
        }
        if !(self.input_scale.is_finite() && self.input_scale != 0.0 && self.input_offset.is_finite()) {
            return bad("input_scale must be finite and non-zero, input_offset finite".to_string());
        }
        if !(self.bn_eps.is_finite() && self.bn_eps > 0.0) {
            return bad(format!("bn_eps must be positive, got {}", self.bn_eps));
        }
        Ok(())
    }

    /// Channels of the head output.
    pub fn head_channels(&self) -> usize {
        match self.head {
            Head::Distance => 1,
            Head::Sigmoid => self.out_channels,
        }
    }

    /// Spatial size of each encoder level (0 = full resolution) for an input of size `d`,
    /// exactly as PyTorch computes it: stride-2 convs give ceil(s/2), max-pool floor(s/2).
    pub fn level_sizes(&self, d: [usize; 3]) -> [[usize; 3]; 5] {
        let mut out = [d; 5];
        for l in 1..5 {
            out[l] = out[l - 1].map(|s| match self.downsample {
                Downsample::Stride => s.div_ceil(2),
                Downsample::Maxpool => s / 2,
            });
        }
        out
    }

    /// Refuses a batch that is not of raw 1-channel volumes the network can down-sample four times.
    pub fn check_input(&self, x: crate::tensor::Shape) -> Result<()> {
        if x.c != 1 {
            return Err(Error::Shape(format!("the network takes 1-channel volumes, got {} channels", x.c)));
        }
        self.check_input_size(x.d)
    }

    /// Refuses volumes the network cannot down-sample four times.
    pub fn check_input_size(&self, d: [usize; 3]) -> Result<()> {
        let min = match self.downsample {
            Downsample::Stride => 1,
            Downsample::Maxpool => 16,
        };
        if d.iter().any(|&s| s < min) {
            return Err(Error::Input(format!(
                "volume {}x{}x{} is too small: the {:?} network down-samples 4 times and needs every side >= {}",
                d[0], d[1], d[2], self.downsample, min
            )));
        }
        Ok(())
    }
}
