//! Symbolic shapes: one graph serves every batch size and sequence length.

use super::DType;
use std::fmt;

/// One dimension: a fixed size, a named symbol (`batch`, `seq`), or an
/// expression over symbols (`batch*seq`, `seq/4`, `past+seq`). A symbol named
/// `""` is unknown (printed `?`). Expressions are kept normalised, so two
/// equal expressions compare equal, and one that reduces to a number or a
/// lone symbol is stored as that.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dim {
    Fixed(u64),
    Sym(String),
    Expr(Box<DimExpr>),
}

/// `Σ coeff·∏symbols`, floor-divided by `div` (≥ 1): the dimension
/// arithmetic that shape computations need (products of batch and sequence,
/// quotients by a group count, sums of past and new lengths). Terms are
/// sorted, have nonzero coefficients and sorted symbol lists; `div` shares no
/// factor with every coefficient.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DimExpr {
    terms: Vec<(Vec<String>, i64)>,
    div: u64,
}

impl DimExpr {
    pub fn constant(c: i64) -> DimExpr {
        DimExpr::normalised(vec![(Vec::new(), c)], 1)
    }

    pub fn symbol(name: &str) -> DimExpr {
        DimExpr::normalised(vec![(vec![name.to_string()], 1)], 1)
    }

    fn normalised(mut terms: Vec<(Vec<String>, i64)>, div: u64) -> DimExpr {
        for (syms, _) in terms.iter_mut() {
            syms.sort();
        }
        terms.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then_with(|| a.0.cmp(&b.0)));
        let mut merged: Vec<(Vec<String>, i64)> = Vec::with_capacity(terms.len());
        for (syms, c) in terms {
            match merged.last_mut() {
                Some((s, acc)) if *s == syms => *acc = acc.saturating_add(c),
                _ => merged.push((syms, c)),
            }
        }
        merged.retain(|(_, c)| *c != 0);
        let mut div = div.max(1);
        if div > 1 {
            let g = merged
                .iter()
                .fold(div, |g, (_, c)| gcd(g, c.unsigned_abs()));
            if g > 1 {
                div /= g;
                for (_, c) in merged.iter_mut() {
                    *c /= g as i64;
                }
            }
        }
        if merged.is_empty() {
            div = 1;
        }
        DimExpr { terms: merged, div }
    }

    /// The value when the expression has no symbols.
    pub fn as_constant(&self) -> Option<i64> {
        match self.terms.as_slice() {
            [] => Some(0),
            [(s, c)] if s.is_empty() => Some(c.div_euclid(self.div as i64)),
            _ => None,
        }
    }

    /// The symbols the expression reads.
    pub fn symbols(&self) -> impl Iterator<Item = &str> {
        self.terms
            .iter()
            .flat_map(|(s, _)| s.iter().map(String::as_str))
    }

    pub fn add(&self, o: &DimExpr) -> Option<DimExpr> {
        // a/d + b = (a + b·d)/d exactly when b is whole; two quotients do not add.
        let (q, whole) = match (self.div, o.div) {
            (1, _) => (o, self),
            (_, 1) => (self, o),
            _ => return None,
        };
        let mut terms = q.terms.clone();
        for (s, c) in &whole.terms {
            terms.push((s.clone(), c.checked_mul(q.div as i64)?));
        }
        Some(DimExpr::normalised(terms, q.div))
    }

    pub fn neg(&self) -> Option<DimExpr> {
        if self.div != 1 {
            return None;
        }
        let terms = self.terms.iter().map(|(s, c)| (s.clone(), -c)).collect();
        Some(DimExpr::normalised(terms, 1))
    }

    pub fn sub(&self, o: &DimExpr) -> Option<DimExpr> {
        self.add(&o.neg()?)
    }

    pub fn mul(&self, o: &DimExpr) -> Option<DimExpr> {
        if self.div != 1 || o.div != 1 {
            // c·(a/d) is (c·a)/d only when d divides c·a; keep it exact.
            let (q, c) = match (self.as_constant(), o.as_constant()) {
                (_, Some(c)) if self.div != 1 => (self, c),
                (Some(c), _) if o.div != 1 => (o, c),
                _ => return None,
            };
            if c >= 0 && c as u64 % q.div == 0 {
                let k = (c as u64 / q.div) as i64;
                let terms = q.terms.iter().map(|(s, x)| (s.clone(), x * k)).collect();
                return Some(DimExpr::normalised(terms, 1));
            }
            return None;
        }
        let mut terms = Vec::with_capacity(self.terms.len() * o.terms.len());
        for (s1, c1) in &self.terms {
            for (s2, c2) in &o.terms {
                let mut s = s1.clone();
                s.extend(s2.iter().cloned());
                terms.push((s, c1.checked_mul(*c2)?));
            }
        }
        Some(DimExpr::normalised(terms, 1))
    }

    /// Floor division: by a positive constant always; by a monomial when it
    /// divides every term exactly (`batch*seq*64 / (batch*seq)` = 64).
    pub fn div_floor(&self, o: &DimExpr) -> Option<DimExpr> {
        if o.div != 1 {
            return None;
        }
        if let Some(c) = o.as_constant() {
            if c <= 0 {
                return None;
            }
            let div = self.div.checked_mul(c as u64)?;
            return Some(DimExpr::normalised(self.terms.clone(), div));
        }
        let [(msyms, mc)] = o.terms.as_slice() else {
            return None;
        };
        if self.div != 1 || *mc <= 0 {
            return None;
        }
        let mut terms = Vec::with_capacity(self.terms.len());
        for (s, c) in &self.terms {
            let mut rest = s.clone();
            for m in msyms {
                let at = rest.iter().position(|x| x == m)?;
                rest.remove(at);
            }
            if c % mc != 0 {
                return None;
            }
            terms.push((rest, c / mc));
        }
        Some(DimExpr::normalised(terms, 1))
    }

    /// The value under `bindings`, when every symbol is bound.
    pub fn eval(&self, bindings: &std::collections::BTreeMap<String, usize>) -> Option<i64> {
        let mut sum: i64 = 0;
        for (syms, c) in &self.terms {
            let mut t = *c;
            for s in syms {
                t = t.checked_mul(i64::try_from(*bindings.get(s)?).ok()?)?;
            }
            sum = sum.checked_add(t)?;
        }
        Some(sum.div_euclid(self.div as i64))
    }

    /// Parses the form `Display` writes (`batch*seq`, `(seq+3)/4`, …).
    pub fn parse(s: &str) -> Option<DimExpr> {
        let toks = tokenize(s)?;
        let mut p = Parser { toks, at: 0 };
        let e = p.expr()?;
        (p.at == p.toks.len()).then_some(e)
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Num(i64),
    Name(String),
    Op(char),
}

fn tokenize(s: &str) -> Option<Vec<Tok>> {
    let mut out = Vec::new();
    let cs: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < cs.len() {
        let c = cs[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() {
            let st = i;
            while i < cs.len() && cs[i].is_ascii_digit() {
                i += 1;
            }
            out.push(Tok::Num(cs[st..i].iter().collect::<String>().parse().ok()?));
        } else if c.is_alphabetic() || c == '_' {
            let st = i;
            while i < cs.len() && (cs[i].is_alphanumeric() || cs[i] == '_' || cs[i] == '.') {
                i += 1;
            }
            out.push(Tok::Name(cs[st..i].iter().collect()));
        } else if "+-*/()".contains(c) {
            out.push(Tok::Op(c));
            i += 1;
        } else {
            return None;
        }
    }
    Some(out)
}

struct Parser {
    toks: Vec<Tok>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at)
    }

    fn expr(&mut self) -> Option<DimExpr> {
        let mut e = self.term()?;
        while let Some(Tok::Op(c @ ('+' | '-'))) = self.peek().cloned() {
            self.at += 1;
            let t = self.term()?;
            e = if c == '+' { e.add(&t)? } else { e.sub(&t)? };
        }
        Some(e)
    }

    fn term(&mut self) -> Option<DimExpr> {
        let mut e = self.factor()?;
        while let Some(Tok::Op(c @ ('*' | '/'))) = self.peek().cloned() {
            self.at += 1;
            let f = self.factor()?;
            e = if c == '*' {
                e.mul(&f)?
            } else {
                e.div_floor(&f)?
            };
        }
        Some(e)
    }

    fn factor(&mut self) -> Option<DimExpr> {
        let t = self.peek()?.clone();
        self.at += 1;
        match t {
            Tok::Num(n) => Some(DimExpr::constant(n)),
            Tok::Name(s) => Some(DimExpr::symbol(&s)),
            Tok::Op('(') => {
                let e = self.expr()?;
                (self.peek() == Some(&Tok::Op(')'))).then(|| self.at += 1)?;
                Some(e)
            }
            Tok::Op('-') => self.factor()?.neg(),
            Tok::Op(_) => None,
        }
    }
}

impl fmt::Display for DimExpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut num = String::new();
        for (i, (syms, c)) in self.terms.iter().enumerate() {
            let (sign, mag) = (if *c < 0 { "-" } else { "+" }, c.unsigned_abs());
            if i > 0 || sign == "-" {
                num.push_str(sign);
            }
            if syms.is_empty() || mag != 1 {
                num.push_str(&mag.to_string());
                if !syms.is_empty() {
                    num.push('*');
                }
            }
            num.push_str(&syms.join("*"));
        }
        if num.is_empty() {
            num.push('0');
        }
        if self.div == 1 {
            f.write_str(&num)
        } else if self.terms.len() == 1 && !num.starts_with('-') {
            write!(f, "{num}/{}", self.div)
        } else {
            write!(f, "({num})/{}", self.div)
        }
    }
}

impl Dim {
    pub fn sym(name: &str) -> Dim {
        Dim::Sym(name.to_string())
    }

    /// A dimension nothing is known about (printed `?`).
    pub fn unknown() -> Dim {
        Dim::Sym(String::new())
    }

    pub fn is_unknown(&self) -> bool {
        matches!(self, Dim::Sym(s) if s.is_empty())
    }

    pub fn fixed(&self) -> Option<u64> {
        match self {
            Dim::Fixed(n) => Some(*n),
            _ => None,
        }
    }

    /// The dimension as an expression (`None` when unknown).
    pub fn expr(&self) -> Option<DimExpr> {
        match self {
            Dim::Fixed(n) => Some(DimExpr::constant(i64::try_from(*n).ok()?)),
            Dim::Sym(s) if s.is_empty() => None,
            Dim::Sym(s) => Some(DimExpr::symbol(s)),
            Dim::Expr(e) => Some((**e).clone()),
        }
    }

    /// The dimension an expression denotes: a number, a lone symbol, or the
    /// expression; unknown when it is a negative constant.
    pub fn from_expr(e: DimExpr) -> Dim {
        if let Some(c) = e.as_constant() {
            return u64::try_from(c)
                .map(Dim::Fixed)
                .unwrap_or_else(|_| Dim::unknown());
        }
        if e.div == 1 {
            if let [(s, 1)] = e.terms.as_slice() {
                if let [name] = s.as_slice() {
                    return Dim::Sym(name.clone());
                }
            }
        }
        Dim::Expr(Box::new(e))
    }

    /// Parses a dimension as written in a model file: a number, a symbol, or
    /// an expression; any other text is kept as one opaque symbol.
    pub fn parse(s: &str) -> Dim {
        if s.is_empty() || s == "?" {
            return Dim::unknown();
        }
        match DimExpr::parse(s) {
            Some(e) => Dim::from_expr(e),
            None => Dim::Sym(s.to_string()),
        }
    }

    /// The size under `bindings`, when every symbol it reads is bound.
    pub fn eval(&self, bindings: &std::collections::BTreeMap<String, usize>) -> Option<u64> {
        match self {
            Dim::Fixed(n) => Some(*n),
            Dim::Sym(s) if s.is_empty() => None,
            Dim::Sym(s) => bindings.get(s).map(|&v| v as u64),
            Dim::Expr(e) => e.eval(bindings).and_then(|v| u64::try_from(v).ok()),
        }
    }

    fn combine(&self, o: &Dim, f: impl FnOnce(&DimExpr, &DimExpr) -> Option<DimExpr>) -> Dim {
        match (self.expr(), o.expr()) {
            (Some(a), Some(b)) => f(&a, &b).map(Dim::from_expr).unwrap_or_else(Dim::unknown),
            _ => Dim::unknown(),
        }
    }

    pub fn plus(&self, o: &Dim) -> Dim {
        self.combine(o, |a, b| a.add(b))
    }

    pub fn minus(&self, o: &Dim) -> Dim {
        self.combine(o, |a, b| a.sub(b))
    }

    pub fn times(&self, o: &Dim) -> Dim {
        self.combine(o, |a, b| a.mul(b))
    }

    pub fn div_floor(&self, o: &Dim) -> Dim {
        self.combine(o, |a, b| a.div_floor(b))
    }

    /// The product of `dims` (1 for none).
    pub fn product<'a>(dims: impl IntoIterator<Item = &'a Dim>) -> Dim {
        dims.into_iter().fold(Dim::Fixed(1), |acc, d| acc.times(d))
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Sym(s) if s.is_empty() => f.write_str("?"),
            Dim::Sym(s) => f.write_str(s),
            Dim::Expr(e) => write!(f, "{e}"),
        }
    }
}

/// The type of a value: element type and, where known, its shape. A shape of
/// `None` means the rank itself is unknown.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Option<Vec<Dim>>,
}

impl TensorType {
    pub fn new(dtype: DType, shape: Vec<Dim>) -> Self {
        TensorType {
            dtype,
            shape: Some(shape),
        }
    }

    pub fn fixed(dtype: DType, dims: &[usize]) -> Self {
        TensorType::new(dtype, dims.iter().map(|&d| Dim::Fixed(d as u64)).collect())
    }

    pub fn unranked(dtype: DType) -> Self {
        TensorType { dtype, shape: None }
    }

    pub fn rank(&self) -> Option<usize> {
        self.shape.as_ref().map(|s| s.len())
    }

    /// Binds the symbols of this type against a concrete shape, checking fixed
    /// dims; returns a description of the first mismatch.
    pub fn check_concrete(
        &self,
        actual: &[usize],
        bindings: &mut std::collections::BTreeMap<String, usize>,
    ) -> std::result::Result<(), String> {
        let Some(shape) = &self.shape else {
            return Ok(());
        };
        if shape.len() != actual.len() {
            return Err(format!(
                "expected rank {} ({}), got shape {:?}",
                shape.len(),
                self,
                actual
            ));
        }
        for (i, (d, &a)) in shape.iter().zip(actual).enumerate() {
            match d {
                Dim::Fixed(n) if *n as usize != a => {
                    return Err(format!(
                        "dimension {i} must be {n} ({}), got shape {:?}",
                        self, actual
                    ))
                }
                Dim::Sym(s) if !s.is_empty() => {
                    if let Some(&prev) = bindings.get(s) {
                        if prev != a {
                            return Err(format!(
                                "dimension {i} is '{s}', bound to {prev} elsewhere, got {a}"
                            ));
                        }
                    } else {
                        bindings.insert(s.clone(), a);
                    }
                }
                _ => {}
            }
        }
        // Expressions once the plain symbols are bound (`batch*seq` after
        // `batch` and `seq`); one that reads an unbound symbol is not checked.
        for (i, (d, &a)) in shape.iter().zip(actual).enumerate() {
            if let Dim::Expr(e) = d {
                if let Some(v) = e.eval(bindings) {
                    if v != a as i64 {
                        return Err(format!(
                            "dimension {i} is {e} = {v} here, got shape {actual:?}"
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The dims when the shape is known.
    pub fn dims(&self) -> Option<&[Dim]> {
        self.shape.as_deref()
    }

    /// The number of elements under `bindings`, when every dim is bound.
    pub fn numel(&self, bindings: &std::collections::BTreeMap<String, usize>) -> Option<u128> {
        let mut n: u128 = 1;
        for d in self.shape.as_ref()? {
            n = n.checked_mul(u128::from(d.eval(bindings)?))?;
        }
        Some(n)
    }
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.dtype)?;
        match &self.shape {
            None => f.write_str("[*]"),
            Some(dims) => {
                f.write_str("[")?;
                for (i, d) in dims.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{d}")?;
                }
                f.write_str("]")
            }
        }
    }
}
